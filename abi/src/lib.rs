//! The ABI between q3c artifacts and the runtime, mirrored by `q3c_abi.h` (the C view of the same contract).
//!
//! Both the code generators and the runtime depend on this crate and nothing else of each other.

use serde::{Deserialize, Serialize};

pub mod cuda;
pub mod launch;

/// Version of the contract below; an artifact with another version is refused. (3: the KV cache's element
/// type is the manifest's `kv.dtype`, f32 or f16; 4: a call holds rows of several sequences, and the KV
/// cache is a pool of blocks addressed through each sequence's block table; 5: sharded models — the
/// `collective` service, the manifest's `ranks` and weight shards; 6: expert stacks split by experts — a
/// weight's `owner`.)
pub const ABI_VERSION: u32 = 6;

/// The C header describing the ABI (shipped for services written in other languages).
pub const HEADER: &str = include_str!("../q3c_abi.h");

/// Exported symbol: `const uint32_t q3c_abi_version`.
pub const SYM_ABI_VERSION: &str = "q3c_abi_version";
/// Exported symbol: `const uint8_t q3c_manifest[]` (JSON).
pub const SYM_MANIFEST: &str = "q3c_manifest";
/// Exported symbol: `const uint64_t q3c_manifest_len`.
pub const SYM_MANIFEST_LEN: &str = "q3c_manifest_len";
/// Exported symbol: `int32_t q3c_forward(const q3c_step *)`.
pub const SYM_FORWARD: &str = "q3c_forward";

/// CPU features an artifact may list in `required_cpu_features` (x86-64 names as the runtime checks them).
pub const CPU_FEATURES: &[&str] = &[
    "sse3",
    "ssse3",
    "sse41",
    "sse42",
    "popcnt",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "lzcnt",
    "cmpxchg16b",
    "avx512f",
    "avx512vl",
    "avx512dq",
    "avx512bw",
    "avx512cd",
    "avx512bitalg",
    "avx512vbmi",
    "avx512vnni",
    "avx512bf16",
    "avx512ifma",
    "avx512vbmi2",
    "avx512vpopcntdq",
    "avx512fp16",
    "gfni",
    "avxvnni",
];

/// `q3c_forward` succeeded.
pub const OK: i32 = 0;
/// `t` was 0 or above `max_tokens_per_call`, or `n_logits` outside `1..=t` (with `logit_rows` set).
pub const ERR_TOKENS: i32 = 1;
/// A token id was outside the vocabulary.
pub const ERR_TOKEN_ID: i32 = 2;

/// `q3c_kernel`: a kernel over work items `[start, end)`.
pub type Kernel = unsafe extern "C" fn(args: *const u64, start: u64, end: u64);

/// `q3c_services.collective`: a collective among the ranks of a sharded model ([`launch::Collective`]).
pub type CollectiveFn =
    unsafe extern "C" fn(ctx: *mut std::ffi::c_void, op: u64, args: *const u64, n: u64);

/// `q3c_services`.
#[repr(C)]
pub struct Services {
    pub parallel_for:
        unsafe extern "C" fn(pool: *mut std::ffi::c_void, kernel: Kernel, args: *const u64, n: u64),
    pub pool: *mut std::ffi::c_void,
    pub collective: CollectiveFn,
    pub collective_ctx: *mut std::ffi::c_void,
}

/// Byte offsets of [`Services`]' fields, for code generators.
pub mod services_offsets {
    pub const PARALLEL_FOR: usize = 0;
    pub const POOL: usize = 8;
    pub const COLLECTIVE: usize = 16;
    pub const COLLECTIVE_CTX: usize = 24;
}

/// Tokens a KV-cache block holds (`Q3C_KV_BLOCK_TOKENS`): position `p` of a sequence lives in cache row
/// `blocks[p / KV_BLOCK_TOKENS] · KV_BLOCK_TOKENS + p % KV_BLOCK_TOKENS` of every layer's pool.
pub const KV_BLOCK_TOKENS: usize = 16;

/// `q3c_seq`: one sequence of a forward call.
#[repr(C)]
pub struct Seq {
    /// Its block table.
    pub blocks: *const u32,
    /// The row after its last row in the call.
    pub end: u64,
}

/// `q3c_step`.
#[repr(C)]
pub struct Step {
    pub ids: *const i32,
    pub t: u64,
    /// Each row's position in its sequence.
    pub pos: *const u32,
    /// Each row's sequence (an index into `seqs`); a sequence's rows are consecutive, positions ascending by one.
    pub seq: *const u32,
    pub seqs: *const Seq,
    pub n_seqs: u64,
    pub weights: *const *const u8,
    pub kv: *const *mut f32,
    pub scratch: *mut u8,
    pub logits: *mut f32,
    pub services: *const Services,
    /// Ascending rows whose logits are written, as rows `0..n_logits` of `logits`; null: every row.
    pub logit_rows: *const u32,
    pub n_logits: u64,
    /// This process's rank of a sharded model (`Manifest::ranks` > 1), else 0.
    pub rank: u64,
}

/// Byte offsets of [`Step`]'s and [`Seq`]'s fields, for code generators.
pub mod step_offsets {
    pub const IDS: i32 = 0;
    pub const T: i32 = 8;
    pub const POS: i32 = 16;
    pub const SEQ: i32 = 24;
    pub const SEQS: i32 = 32;
    pub const N_SEQS: i32 = 40;
    pub const WEIGHTS: i32 = 48;
    pub const KV: i32 = 56;
    pub const SCRATCH: i32 = 64;
    pub const LOGITS: i32 = 72;
    pub const SERVICES: i32 = 80;
    pub const LOGIT_ROWS: i32 = 88;
    pub const N_LOGITS: i32 = 96;
    pub const RANK: i32 = 104;
    /// Bytes of one `q3c_seq`.
    pub const SEQ_BYTES: usize = 16;
    pub const SEQ_BLOCKS: i32 = 0;
    pub const SEQ_END: i32 = 8;
}

/// `int32_t q3c_forward(const q3c_step *)`.
pub type Forward = unsafe extern "C" fn(step: *const Step) -> i32;

/// `kernel_dtype` of a weight the runtime quantizes to 8 bits when binding it.
///
/// Each group of 32 elements of a row gets a scale `d = max|w| / 127` and values `q = round(w / d)` (to
/// nearest, ties to even), so that `w[i][j] ≈ d[i][j/32] · q[i][j]`. A `[n, k]` matrix (n a multiple of 16,
/// k of 32) is stored in panels of 16 rows: panel `p`, group `g` is 512 bytes, where the 4 bytes at
/// `(p·k/32 + g)·512 + s·64 + r·4` are `q[16p + r][32g + 4s .. 32g + 4s + 4]` plus 128 (unsigned), for
/// step `s` in 0..8 and row `r` in 0..16 — so one 64-byte load feeds a 512-bit `vpdpbusd` with four
/// elements of each of the panel's 16 rows. After the `n·k` bytes come the `n·k/32` scales as f32, the
/// 16 of panel `p`, group `g` at `(p·k/32 + g)·16 + r`.
pub const Q8_LAYOUT: &str = "q8";

/// `kernel_dtype` of a weight the runtime quantizes to 4 bits when binding it.
///
/// Each group of 32 elements of a row gets a scale `d = m / −8`, `m` the group's element of largest
/// magnitude, and values `q = clamp(round(w / d), −8, 7)` (to nearest, ties to even), so that
/// `w[i][j] ≈ d[i][j/32] · q[i][j]` and `m` itself is exact (as llama.cpp's Q4_0). A `[n, k]` matrix (n a
/// multiple of 16, k of 32) is stored in panels of 16 rows: panel `p`, group `g` is 256 bytes, where the
/// 4 bytes at `(p·k/32 + g)·256 + v·64 + r·4` hold, in their low nibbles, `q[16p + r][32g + 4v ..][..4]`
/// plus 8 and, in their high nibbles, `q[16p + r][32g + 4(v + 4) ..][..4]` plus 8, for `v` in 0..4 and
/// row `r` in 0..16 — so one 64-byte load unpacks into two `vpdpbusd` steps. After the `n·k/2` bytes come
/// the `n·k/32` scales as IEEE f16, the 16 of panel `p`, group `g` at `(p·k/32 + g)·16 + r`.
pub const Q4_LAYOUT: &str = "q4";

/// `kernel_dtype` of a weight the runtime quantizes to 6 bits when binding it (the logits matrix of a
/// [`Q4_LAYOUT`] model).
///
/// As [`Q4_LAYOUT`] with 64 levels: `d = m / −32` and `q = clamp(round(w / d), −32, 31)`, stored `q + 32`
/// (six bits). Panel `p`, group `g` is 384 bytes: its first 256 bytes are laid out as a [`Q4_LAYOUT`] group's,
/// holding the low four bits of each stored value; then two 64-byte planes of the high two bits, the byte at
/// `256 + h·64 + r·4 + j` holding in its bits `2t, 2t + 1` those of element `32g + 4(4h + t) + j` of row
/// `16p + r`, for `h` in 0..2, `t` in 0..4, `j` in 0..4 — so step `s` (elements `4s ..  4s + 4` of every row)
/// is the nibbles of step `s` ORed with plane `s / 4` shifted by `2(s % 4)`. After the `n·k·3/4` bytes come
/// the `n·k/32` scales as IEEE f16, the 16 of panel `p`, group `g` at `(p·k/32 + g)·16 + r`.
pub const Q6_LAYOUT: &str = "q6";

/// The `kernel_dtype`s of weights the runtime packs into panels ([`Q8_LAYOUT`], [`Q4_LAYOUT`], [`Q6_LAYOUT`]).
pub const PACKED_FORMATS: [&str; 3] = [Q8_LAYOUT, Q4_LAYOUT, Q6_LAYOUT];

/// `layout` of a weight bound as stored (or widened): the checkpoint's row-major order.
pub const LAYOUT_ROW_MAJOR: &str = "row-major";
/// `layout` of a [`Q8_LAYOUT`] weight: panels of 16 rows, as described there.
pub const LAYOUT_Q8_PANELS: &str = "panels-16";
/// `layout` of a [`Q4_LAYOUT`] weight: panels of 16 rows of packed nibbles, as described there.
pub const LAYOUT_Q4_PANELS: &str = "panels-16-nibbles";
/// `layout` of a [`Q6_LAYOUT`] weight: panels of 16 rows of nibbles and planes of high bits, as described there.
pub const LAYOUT_Q6_PANELS: &str = "panels-16-nibbles-planes";

/// The `layout` of a weight the kernels read as `kernel_dtype`.
pub fn layout_for(kernel_dtype: &str) -> &'static str {
    match kernel_dtype {
        Q8_LAYOUT => LAYOUT_Q8_PANELS,
        Q4_LAYOUT => LAYOUT_Q4_PANELS,
        Q6_LAYOUT => LAYOUT_Q6_PANELS,
        _ => LAYOUT_ROW_MAJOR,
    }
}

/// How the runtime must lay out one bound weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightEntry {
    /// Checkpoint tensor name.
    pub name: String,
    pub shape: Vec<usize>,
    /// Dtype in the checkpoint (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Dtype the kernels read (`f16` checkpoints are widened to `f32` at load time).
    pub kernel_dtype: String,
    /// [`LAYOUT_ROW_MAJOR`], or [`LAYOUT_Q8_PANELS`] for `q8` weights.
    pub layout: String,
    /// Set where each rank of a sharded model binds a slice: `shape` is the slice's, the checkpoint's is
    /// [`WeightShard::full_shape`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<WeightShard>,
    /// Set on the experts of a stack split by experts: only the ranks it names bind this tensor; on the
    /// others its table entry is null (their kernels drop the tokens routed to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<WeightOwner>,
}

/// Which ranks of a sharded model bind a tensor that not every rank holds: those whose part (of `parts`
/// parts over `ranks` ranks, as [`WeightShard::part`] counts) is `part`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightOwner {
    pub part: usize,
    pub parts: usize,
    pub ranks: usize,
}

impl WeightOwner {
    /// Whether rank `rank` binds the tensor.
    pub fn binds(&self, rank: usize) -> bool {
        rank * self.parts / self.ranks == self.part
    }
}

/// The slice of a checkpoint tensor a rank binds: the tensor cut into `parts` equal parts along `axis`,
/// rank `r` of `ranks` taking part `r · parts / ranks` (ranks share a part when there are fewer parts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightShard {
    pub axis: usize,
    pub parts: usize,
    pub ranks: usize,
}

impl WeightShard {
    /// The part rank `rank` binds.
    pub fn part(&self, rank: usize) -> usize {
        rank * self.parts / self.ranks
    }

    /// The checkpoint tensor's shape, given the slice's.
    pub fn full_shape(&self, slice: &[usize]) -> Vec<usize> {
        let mut full = slice.to_vec();
        full[self.axis] *= self.parts;
        full
    }
}

/// KV-cache geometry: per layer, K and V pools of `[blocks · KV_BLOCK_TOKENS, kv_heads]` rows of `head_dim`
/// elements of `dtype`: `f32`, IEEE `f16`, `bf16` (the upper half of an f32), or `q8` (see [`kv_head_row_bytes`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: String,
}

/// The KV-cache element types a runtime holds.
pub const KV_DTYPES: [&str; 4] = ["f32", "f16", "bf16", "q8"];

/// Elements per scale in a `q8` KV row: 32, or for a head_dim that 32 does not divide, the largest power of
/// two that does.
pub fn kv_q8_group(head_dim: usize) -> usize {
    (1usize << head_dim.trailing_zeros()).min(32)
}

/// Bytes of one KV head's row of `head_dim` elements of `dtype` (one of [`KV_DTYPES`]). A `q8` row is
/// `head_dim` signed bytes, then one f32 scale per group of [`kv_q8_group`] elements (element `i` is
/// `byte[i] · scale[i / group]`; a group's scale is its largest magnitude / 127, its bytes rounded to
/// nearest even).
pub fn kv_head_row_bytes(dtype: &str, head_dim: usize) -> usize {
    match dtype {
        "q8" => head_dim + 4 * (head_dim / kv_q8_group(head_dim)),
        "f16" | "bf16" => 2 * head_dim,
        _ => 4 * head_dim,
    }
}

impl KvGeometry {
    /// Bytes of one cached token in one buffer (one layer's K or V).
    pub fn row_bytes(&self) -> usize {
        self.kv_heads * kv_head_row_bytes(&self.dtype, self.head_dim)
    }

    /// Bytes of one cached token in all buffers (every layer's K and V).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.row_bytes()
    }
}

/// Everything the runtime needs to know about an artifact, embedded in it as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub abi_version: u32,
    pub compiler_version: String,
    pub backend: String,
    /// The model's `config.json` as q3c understood it.
    pub config: serde_json::Value,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
    pub weights: Vec<WeightEntry>,
    pub kv: KvGeometry,
    pub max_tokens_per_call: usize,
    pub scratch_bytes_per_token: usize,
    pub fusion: String,
    /// `f32`, or `bf16` where matrix products over bf16 weights round activations to bf16 (AVX512_BF16).
    #[serde(default = "f32_name")]
    pub matmul_activations: String,
    pub target_cpu: String,
    /// CPU features the code uses (e.g. `sse4.1`, `fma`); the runtime refuses a CPU without them.
    pub required_cpu_features: Vec<String>,
    /// Kernels (work items dispatched) per forward call, for inspection.
    pub kernels: usize,
    /// Present in artifacts without `q3c_forward`, whose kernels the runtime launches itself (the GPU
    /// flavour compiled for the CPU): every dispatch of a forward call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<launch::LaunchPlan>,
    /// Ranks the model is sharded over (one process each; 1: not sharded). Every rank loads this same
    /// artifact, binding its slice of the sharded weights, and their forward calls meet in collectives
    /// (`q3c_services.collective`).
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

fn f32_name() -> String {
    "f32".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_rust_agree() {
        assert!(HEADER.contains(&format!("#define Q3C_ABI_VERSION {ABI_VERSION}u")));
        assert!(HEADER.contains(&format!("#define Q3C_ERR_TOKENS {ERR_TOKENS} ")));
        assert!(HEADER.contains(&format!("#define Q3C_ERR_TOKEN_ID {ERR_TOKEN_ID} ")));
        for sym in [SYM_ABI_VERSION, SYM_MANIFEST, SYM_MANIFEST_LEN, SYM_FORWARD] {
            assert!(HEADER.contains(sym), "{sym}");
        }
        assert_eq!(std::mem::size_of::<Step>(), step_offsets::RANK as usize + 8);
        use step_offsets as so;
        for (field, at) in [
            (std::mem::offset_of!(Step, pos), so::POS),
            (std::mem::offset_of!(Step, seq), so::SEQ),
            (std::mem::offset_of!(Step, seqs), so::SEQS),
            (std::mem::offset_of!(Step, n_seqs), so::N_SEQS),
            (std::mem::offset_of!(Step, kv), so::KV),
            (std::mem::offset_of!(Step, scratch), so::SCRATCH),
            (std::mem::offset_of!(Step, services), so::SERVICES),
            (std::mem::offset_of!(Step, logit_rows), so::LOGIT_ROWS),
            (std::mem::offset_of!(Step, n_logits), so::N_LOGITS),
            (std::mem::offset_of!(Step, rank), so::RANK),
            (std::mem::offset_of!(Seq, end), so::SEQ_END),
        ] {
            assert_eq!(field, at as usize);
        }
        assert_eq!(std::mem::size_of::<Seq>(), so::SEQ_BYTES);
        assert!(HEADER.contains("uint64_t n_logits;"));
        assert!(HEADER.contains("uint64_t rank;"));
        for (field, at) in [
            (std::mem::offset_of!(Services, pool), services_offsets::POOL),
            (
                std::mem::offset_of!(Services, collective),
                services_offsets::COLLECTIVE,
            ),
            (
                std::mem::offset_of!(Services, collective_ctx),
                services_offsets::COLLECTIVE_CTX,
            ),
        ] {
            assert_eq!(field, at);
        }
        assert!(HEADER.contains(&format!(
            "#define Q3C_ALL_REDUCE {}u",
            launch::Collective::AllReduce { parts: 0 }.word()
        )));
        assert!(HEADER.contains(&format!(
            "#define Q3C_ALL_GATHER {}u",
            launch::Collective::AllGather.word()
        )));
        assert!(HEADER.contains(&format!("#define Q3C_KV_BLOCK_TOKENS {KV_BLOCK_TOKENS}u")));
        // launch::LaunchedKernel's C view.
        assert!(HEADER.contains(
            "(*q3c_launched_kernel)(const uint64_t *args, uint64_t items, uint64_t block, uint64_t threads,"
        ));
        assert_eq!(
            std::mem::offset_of!(Step, weights),
            step_offsets::WEIGHTS as usize
        );
        assert_eq!(
            std::mem::offset_of!(Step, logits),
            step_offsets::LOGITS as usize
        );
    }
}
