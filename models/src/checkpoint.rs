//! Safetensors checkpoints: memory-mapped, single file or sharded, checked tensor by tensor against a config.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::config::Qwen3Config;
use crate::dtype::DType;
use crate::tensors::{expected_tensors, TensorSpec, LM_HEAD};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The safetensors metadata key (`__metadata__`) under which a file lists its pre-quantized tensors, as a
/// JSON object: `{"<tensor>": {"format": "q4", "layout": "panels-16-nibbles", "shape": [n, k], "dtype":
/// "bf16"}}` — each stored as a `U8` tensor of the packed bytes (`q3c_abi::Q4_LAYOUT`, `Q8_LAYOUT`), with
/// the shape and dtype of the tensor it was quantized from.
pub const PACKED_KEY: &str = "q3c.packed";

/// How a pre-quantized tensor's bytes are laid out (a `kernel_dtype` and `layout` of `q3c_abi`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    pub format: String,
    pub layout: String,
}

/// Why a checkpoint could not be opened or does not fit its config.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no {SINGLE_FILE} or {INDEX_FILE} in {0}")]
    NotFound(PathBuf),
    #[error("bad shard index {path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "tensor {name} in {path} has dtype {dtype}, which is not supported (F32, BF16 or F16)"
    )]
    UnsupportedDType {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("tensor {name} appears in both {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("the checkpoint does not match the model config:\n{0}")]
    Mismatch(Mismatches),
}

/// One way a checkpoint differs from what its config implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing {
        name: String,
        expected: Vec<usize>,
    },
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    Extra {
        name: String,
        found: Vec<usize>,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { name, expected } => {
                write!(f, "missing tensor {name} (expected shape {expected:?})")
            }
            Problem::Shape {
                name,
                expected,
                found,
            } => {
                write!(
                    f,
                    "tensor {name} has shape {found:?}, expected {expected:?}"
                )
            }
            Problem::Extra { name, found } => {
                write!(f, "unexpected tensor {name} (shape {found:?})")
            }
        }
    }
}

/// Every problem found: a count of each kind, then up to 8 of each kind, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatches(pub Vec<Problem>);

impl fmt::Display for Mismatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        type IsKind = fn(&Problem) -> bool;
        let kinds: [(&str, IsKind); 3] = [
            ("missing", |p| matches!(p, Problem::Missing { .. })),
            ("mis-shaped", |p| matches!(p, Problem::Shape { .. })),
            ("unexpected", |p| matches!(p, Problem::Extra { .. })),
        ];
        let counts: Vec<String> = kinds
            .iter()
            .map(|(label, is)| (label, self.0.iter().filter(|p| is(p)).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(label, n)| format!("{n} {label}"))
            .collect();
        writeln!(
            f,
            "  {} tensor problem(s): {}",
            self.0.len(),
            counts.join(", ")
        )?;
        for (_, is) in kinds {
            let of_kind: Vec<&Problem> = self.0.iter().filter(|p| is(p)).collect();
            for p in of_kind.iter().take(SHOWN) {
                writeln!(f, "  {p}")?;
            }
            if of_kind.len() > SHOWN {
                writeln!(f, "  ... and {} more like this", of_kind.len() - SHOWN)?;
            }
        }
        Ok(())
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    len: usize,
    packed: Option<Packed>,
}

/// A borrowed view of one tensor's bytes.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    /// The dtype of the tensor (for a pre-quantized one, of the tensor it was quantized from).
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Little-endian elements, row-major; or the packed bytes of a pre-quantized tensor.
    pub bytes: &'a [u8],
    /// How a pre-quantized tensor is packed (`None`: plain elements).
    pub packed: Option<&'a Packed>,
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements widened to f32 (exact for all supported dtypes).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.widen_into(0, &mut out);
        out
    }

    /// The bytes of the slice `start .. start + len` along `axis` (plain tensors only), row-major: what a
    /// rank of a sharded model binds.
    pub fn slice_bytes(&self, axis: usize, start: usize, len: usize) -> Vec<u8> {
        assert!(
            self.packed.is_none(),
            "a pre-quantized tensor has no plain elements"
        );
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product::<usize>() * self.dtype.size();
        let run = self.shape[axis] * inner;
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let at = o * run + start * inner;
            out.extend_from_slice(&self.bytes[at..at + len * inner]);
        }
        out
    }

    /// Elements `start .. start + out.len()` widened to f32 into `out` (plain tensors only).
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        assert!(
            self.packed.is_none(),
            "a pre-quantized tensor has no plain elements"
        );
        let size = self.dtype.size();
        let bytes = &self.bytes[start * size..(start + out.len()) * size];
        let pairs = out.iter_mut().zip(bytes.chunks_exact(size));
        match self.dtype {
            DType::F32 => {
                pairs.for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            }
            DType::BF16 => pairs.for_each(|(o, c)| {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)
            }),
            DType::F16 => {
                pairs.for_each(|(o, c)| *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            }
        }
    }
}

/// An opened checkpoint: every shard memory-mapped, every tensor's place known.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let shard_names: Vec<String> = if index.is_file() {
            read_index(&index)?
        } else if single.is_file() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(CheckpointError::NotFound(dir.to_path_buf()));
        };
        let mut ckpt = Checkpoint {
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for name in shard_names {
            ckpt.add_file(&dir.join(name))?;
        }
        if index.is_file() {
            ckpt.check_index(&index)?;
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; checkpoints are not expected to change while a model is loaded.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let file_idx = self.files.len();
        let bad = |message: String| CheckpointError::Format {
            path: path.to_path_buf(),
            message,
        };
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let mut packed = match meta.metadata().as_ref().and_then(|m| m.get(PACKED_KEY)) {
            Some(json) => parse_packed(json).map_err(|m| bad(format!("{PACKED_KEY}: {m}")))?,
            None => BTreeMap::new(),
        };
        for (name, view) in st.tensors() {
            let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
            if let Some((how, shape, dtype)) = packed.remove(&name) {
                if view.dtype() != safetensors::Dtype::U8 || view.shape().len() != 1 {
                    return Err(bad(format!(
                        "pre-quantized tensor {name} must be stored as U8 bytes, is {:?} {:?}",
                        view.dtype(),
                        view.shape()
                    )));
                }
                let entry = Entry {
                    file: file_idx,
                    dtype,
                    shape,
                    start,
                    len: view.data().len(),
                    packed: Some(how),
                };
                self.insert(name, entry, path)?;
                continue;
            }
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F16 => DType::F16,
                other => {
                    return Err(CheckpointError::UnsupportedDType {
                        name,
                        path: path.to_path_buf(),
                        dtype: format!("{other:?}"),
                    })
                }
            };
            let entry = Entry {
                file: file_idx,
                dtype,
                shape: view.shape().to_vec(),
                start,
                len: view.data().len(),
                packed: None,
            };
            self.insert(name, entry, path)?;
        }
        if let Some(name) = packed.keys().next() {
            return Err(bad(format!(
                "{PACKED_KEY} lists {name}, which the file lacks"
            )));
        }
        self.files.push((path.to_path_buf(), map));
        Ok(())
    }

    fn insert(&mut self, name: String, entry: Entry, path: &Path) -> Result<(), CheckpointError> {
        match self.tensors.insert(name.clone(), entry) {
            Some(prev) => Err(CheckpointError::Duplicate {
                name,
                first: self.files[prev.file].0.clone(),
                second: path.to_path_buf(),
            }),
            None => Ok(()),
        }
    }

    /// The formats of the pre-quantized tensors (`q4`, `q8`), sorted; empty for a plain checkpoint.
    pub fn packed_formats(&self) -> Vec<&str> {
        let mut formats: Vec<&str> = self
            .tensors
            .values()
            .filter_map(|e| e.packed.as_ref().map(|p| p.format.as_str()))
            .collect();
        formats.sort();
        formats.dedup();
        formats
    }

    /// Every tensor the index names must be in the shard it names.
    fn check_index(&self, index: &Path) -> Result<(), CheckpointError> {
        for (tensor, shard) in read_weight_map(index)? {
            let found = self.tensors.get(&tensor).map(|e| &self.files[e.file].0);
            if found.and_then(|p| p.file_name()).and_then(|n| n.to_str()) != Some(shard.as_str()) {
                return Err(CheckpointError::Index {
                    path: index.to_path_buf(),
                    message: format!("tensor {tensor} is listed in {shard} but not found there"),
                });
            }
        }
        Ok(())
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        let e = self.tensors.get(name)?;
        let map = &self.files[e.file].1;
        Some(TensorRef {
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &map[e.start..e.start + e.len],
            packed: e.packed.as_ref(),
        })
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The files this checkpoint was read from.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Checks that the checkpoint holds exactly the tensors `cfg` implies, with the right shapes.
    /// A tied checkpoint may still carry `lm_head.weight`; it is ignored.
    pub fn check(&self, cfg: &Qwen3Config) -> Result<(), CheckpointError> {
        let tied = cfg.tie_word_embeddings;
        self.check_tensors(&expected_tensors(cfg), |name| tied && name == LM_HEAD)
    }

    /// Checks that the checkpoint holds exactly the tensors `expected` (names and shapes), apart from
    /// extra tensors `ignored` accepts; lists every missing, mis-shaped and unexpected tensor.
    pub fn check_tensors(
        &self,
        expected: &[TensorSpec],
        ignored: impl Fn(&str) -> bool,
    ) -> Result<(), CheckpointError> {
        let mut problems = Vec::new();
        for spec in expected {
            match self.tensors.get(&spec.name) {
                None => problems.push(Problem::Missing {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                }),
                Some(e) if e.shape != spec.shape => problems.push(Problem::Shape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    found: e.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|s| s.name.as_str()).collect();
        for (name, e) in &self.tensors {
            if !known.contains(name.as_str()) && !ignored(name) {
                problems.push(Problem::Extra {
                    name: name.clone(),
                    found: e.shape.clone(),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::Mismatch(Mismatches(problems)))
        }
    }
}

/// A pre-quantized tensor as its file's metadata lists it: packing, shape and dtype of the original.
type PackedInfo = (Packed, Vec<usize>, DType);

/// The pre-quantized tensors a file's [`PACKED_KEY`] metadata lists, by name.
fn parse_packed(json: &str) -> Result<BTreeMap<String, PackedInfo>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("malformed JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    object
        .iter()
        .map(|(name, info)| {
            let text = |key: &str| {
                info.get(key)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| format!("{name}: no string `{key}`"))
            };
            let shape = info
                .get("shape")
                .and_then(|v| v.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| format!("{name}: no integer array `shape`"))?;
            let dtype = text("dtype")?;
            let dtype = [DType::F32, DType::BF16, DType::F16]
                .into_iter()
                .find(|d| d.name() == dtype)
                .ok_or_else(|| format!("{name}: unknown dtype {dtype}"))?;
            let packed = Packed {
                format: text("format")?,
                layout: text("layout")?,
            };
            Ok((name.clone(), (packed, shape, dtype)))
        })
        .collect()
}

fn read_weight_map(index: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let bad = |message: String| CheckpointError::Index {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|source| CheckpointError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.iter()
        .map(|(tensor, file)| match file.as_str() {
            Some(f) if !f.contains('/') && !f.contains('\\') && f != ".." => Ok((tensor.clone(), f.to_string())),
            _ => Err(bad(format!("weight_map entry for {tensor} must be a file name in the same directory, is {file}"))),
        })
        .collect()
}

/// The distinct shard files an index names, sorted.
fn read_index(index: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut files: Vec<String> = read_weight_map(index)?.into_values().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(CheckpointError::Index {
            path: index.to_path_buf(),
            message: "`weight_map` is empty".into(),
        });
    }
    Ok(files)
}
