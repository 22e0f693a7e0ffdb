//! Running compiled artifacts: load a `.so`, check it, bind weights, and open sessions on it.
//!
//! Loading checks, in order and before any artifact code runs: the file is a shared library, it exports the
//! q3c symbols, its ABI version is ours, its manifest parses, this CPU has the features it was compiled
//! for, and the checkpoint holds exactly the weights the manifest lists (names, shapes, dtypes).

mod arena;
mod elf;
mod launcher;
mod pool;
pub mod quant;

use std::path::Path;
use std::sync::Mutex;

use q3c_abi::launch::LaunchedKernel;
use q3c_abi::{Forward, Manifest, Services, Step, ABI_VERSION};
use q3c_models::tensors::TensorSpec;
use q3c_models::{Checkpoint, Qwen3Config};

use arena::Arena;
pub use arena::Residency;
pub use pool::ThreadPool;

use crate::error::RuntimeError;
use crate::session::{Logits, Session};

/// Default KV-cache capacity of a session, in tokens (capped by the model's `max_position_embeddings`).
pub const DEFAULT_CONTEXT: usize = 4096;

/// A loaded artifact with its weights bound, shareable by many sessions.
pub struct CompiledModel {
    manifest: Manifest,
    config: Qwen3Config,
    entry: Entry,
    /// Pointer per manifest weight: into `arena`, or into the memory-mapped checkpoint.
    weight_ptrs: Vec<*const u8>,
    _arena: Arena,
    /// Kept only while weights are read from it in place (`Residency::Mapped`).
    _checkpoint: Option<Checkpoint>,
    pool: Mutex<Box<ThreadPool>>,
    /// What keeps the code alive: the loaded library, or in-process JIT memory.
    _code: Box<dyn std::any::Any + Send + Sync>,
}

/// How a forward call enters the artifact.
enum Entry {
    /// Its own `q3c_forward`.
    Forward(Forward),
    /// The runtime launches its kernels ([`launcher::Launcher`]).
    Launched(launcher::Launcher),
}

// SAFETY: the weights are immutable after loading; the generated code keeps no global state, so concurrent
// calls with distinct steps are safe; the thread pool is used under its mutex.
unsafe impl Send for CompiledModel {}
unsafe impl Sync for CompiledModel {}

fn artifact_err(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Artifact {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Reads the ABI version and manifest of an artifact without binding anything.
pub fn read_manifest(path: &Path) -> Result<Manifest, RuntimeError> {
    let lib = open_library(path)?;
    let manifest = check_library(path, &lib)?;
    Ok(manifest)
}

fn open_library(path: &Path) -> Result<libloading::Library, RuntimeError> {
    if !path.is_file() {
        return Err(artifact_err(path, "no such file"));
    }
    let bytes = std::fs::read(path).map_err(|e| artifact_err(path, format!("cannot read: {e}")))?;
    elf::check(&bytes)
        .map_err(|why| artifact_err(path, format!("not a loadable shared library ({why})")))?;
    // SAFETY: q3c artifacts are linked with -nostartfiles and have no initialisers; for any other library,
    // loading may run its initialisers, as dlopen always does.
    // dlopen searches the library path for a name without a slash: always pass an absolute path.
    let absolute = std::path::absolute(path)
        .map_err(|e| artifact_err(path, format!("cannot resolve the path: {e}")))?;
    unsafe { libloading::Library::new(&absolute) }
        .map_err(|e| artifact_err(path, format!("not a loadable shared library ({e})")))
}

fn check_library(path: &Path, lib: &libloading::Library) -> Result<Manifest, RuntimeError> {
    let not_q3c = |sym: &str| artifact_err(path, format!("not a q3c artifact (no `{sym}` symbol)"));
    // SAFETY: data symbols of the documented types (q3c_abi.h).
    let version = unsafe { lib.get::<*const u32>(q3c_abi::SYM_ABI_VERSION.as_bytes()) }
        .map_err(|_| not_q3c(q3c_abi::SYM_ABI_VERSION))?;
    let version = unsafe { **version };
    if version != ABI_VERSION {
        return Err(artifact_err(
            path,
            format!("built for q3c ABI version {version}, this runtime speaks version {ABI_VERSION}; recompile it with this q3c"),
        ));
    }
    let len = unsafe { lib.get::<*const u64>(q3c_abi::SYM_MANIFEST_LEN.as_bytes()) }
        .map_err(|_| not_q3c(q3c_abi::SYM_MANIFEST_LEN))?;
    let data = unsafe { lib.get::<*const u8>(q3c_abi::SYM_MANIFEST.as_bytes()) }
        .map_err(|_| not_q3c(q3c_abi::SYM_MANIFEST))?;
    let bytes = unsafe { std::slice::from_raw_parts(*data, **len as usize) };
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| artifact_err(path, format!("corrupt manifest: {e}")))?;
    if manifest.abi_version != ABI_VERSION {
        return Err(artifact_err(
            path,
            format!(
                "manifest says ABI version {}, expected {ABI_VERSION}",
                manifest.abi_version
            ),
        ));
    }
    if !matches!(manifest.kv.dtype.as_str(), "f32" | "f16") {
        return Err(artifact_err(
            path,
            format!(
                "the manifest's KV cache is {}; this runtime holds f32 or f16 caches",
                manifest.kv.dtype
            ),
        ));
    }
    Ok(manifest)
}

/// CPU features the artifact needs that this CPU lacks (or that this runtime cannot check).
fn missing_cpu_features(required: &[String]) -> Vec<String> {
    required
        .iter()
        .filter(|f| cpu_has(f) != Some(true))
        .cloned()
        .collect()
}

/// Whether this CPU has `feature` (a [`q3c_abi::CPU_FEATURES`] name); `None` for a name it cannot check.
#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> Option<bool> {
    use std::arch::is_x86_feature_detected as has;
    Some(match feature {
        "sse3" => has!("sse3"),
        "ssse3" => has!("ssse3"),
        "sse41" => has!("sse4.1"),
        "sse42" => has!("sse4.2"),
        "popcnt" => has!("popcnt"),
        "avx" => has!("avx"),
        "avx2" => has!("avx2"),
        "fma" => has!("fma"),
        "f16c" => has!("f16c"),
        "bmi1" => has!("bmi1"),
        "bmi2" => has!("bmi2"),
        "lzcnt" => has!("lzcnt"),
        "cmpxchg16b" => has!("cmpxchg16b"),
        "avx512f" => has!("avx512f"),
        "avx512vl" => has!("avx512vl"),
        "avx512dq" => has!("avx512dq"),
        "avx512bw" => has!("avx512bw"),
        "avx512cd" => has!("avx512cd"),
        "avx512bitalg" => has!("avx512bitalg"),
        "avx512vbmi" => has!("avx512vbmi"),
        "avx512vnni" => has!("avx512vnni"),
        "avx512bf16" => has!("avx512bf16"),
        "avxvnni" => has!("avxvnni"),
        _ => return None,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> Option<bool> {
    None
}

#[cfg(all(test, target_arch = "x86_64"))]
mod cpu_feature_tests {
    #[test]
    fn every_abi_feature_can_be_checked() {
        for f in q3c_abi::CPU_FEATURES {
            assert!(super::cpu_has(f).is_some(), "{f}");
        }
        assert_eq!(super::cpu_has("no-such-feature"), None);
    }
}

impl CompiledModel {
    /// Loads `artifact`, checks it, and binds the weights in `weights_dir` with a pool of `threads` threads
    /// (weights copied into huge-page memory: [`Residency::Copied`]).
    pub fn load(
        artifact: &Path,
        weights_dir: &Path,
        threads: usize,
    ) -> Result<CompiledModel, RuntimeError> {
        Self::load_with(artifact, weights_dir, threads, Residency::default())
    }

    /// [`CompiledModel::load`], saying where the weights the kernels read unchanged live.
    pub fn load_with(
        artifact: &Path,
        weights_dir: &Path,
        threads: usize,
        residency: Residency,
    ) -> Result<CompiledModel, RuntimeError> {
        let library = open_library(artifact)?;
        let manifest = check_library(artifact, &library)?;
        let missing = missing_cpu_features(&manifest.required_cpu_features);
        if !missing.is_empty() {
            return Err(artifact_err(
                artifact,
                format!(
                    "compiled for CPU features this CPU lacks: {}; recompile with --target-cpu",
                    missing.join(", ")
                ),
            ));
        }
        let entry = match &manifest.launch {
            Some(plan) => {
                let kernels = plan
                    .kernels
                    .iter()
                    .map(|name| {
                        // SAFETY: launched kernels have the documented signature (q3c_abi::launch).
                        unsafe { library.get::<LaunchedKernel>(name.as_bytes()) }
                            .map(|f| *f)
                            .map_err(|_| {
                                artifact_err(
                                    artifact,
                                    format!("its launch plan names a missing kernel {name}"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Entry::Launched(launcher::Launcher::new(
                    plan.clone(),
                    kernels,
                    manifest.max_tokens_per_call,
                    manifest.vocab_size,
                ))
            }
            // SAFETY: the symbol has the documented signature (q3c_abi.h); the ABI version was checked above.
            None => unsafe { library.get::<Forward>(q3c_abi::SYM_FORWARD.as_bytes()) }
                .map(|f| Entry::Forward(*f))
                .map_err(|_| {
                    artifact_err(artifact, "not a q3c artifact (no `q3c_forward` symbol)")
                })?,
        };
        Self::bind(
            artifact,
            manifest,
            entry,
            Box::new(library),
            weights_dir,
            threads,
            residency,
        )
    }

    /// Binds weights to code already in memory (e.g. compiled in process by a JIT). `code` is kept alive as
    /// long as the model; `forward` must implement the ABI of `q3c_abi` for `manifest`.
    ///
    /// # Safety
    /// `forward` must be the `q3c_forward` of code built for exactly `manifest`, and stay valid while `code` lives.
    pub unsafe fn from_code(
        forward: Forward,
        manifest: Manifest,
        code: Box<dyn std::any::Any + Send + Sync>,
        weights_dir: &Path,
        threads: usize,
        residency: Residency,
    ) -> Result<CompiledModel, RuntimeError> {
        if manifest.abi_version != ABI_VERSION {
            return Err(RuntimeError::Internal(format!(
                "in-process code speaks ABI {}",
                manifest.abi_version
            )));
        }
        Self::bind(
            Path::new("(in-process code)"),
            manifest,
            Entry::Forward(forward),
            code,
            weights_dir,
            threads,
            residency,
        )
    }

    fn bind(
        artifact: &Path,
        manifest: Manifest,
        entry: Entry,
        code: Box<dyn std::any::Any + Send + Sync>,
        weights_dir: &Path,
        threads: usize,
        residency: Residency,
    ) -> Result<CompiledModel, RuntimeError> {
        let config = Qwen3Config::from_json(&manifest.config.to_string())
            .map_err(|e| artifact_err(artifact, format!("manifest config: {e}")))?;
        let checkpoint = Checkpoint::open(weights_dir)?;
        // The manifest lists exactly the tensors the graph reads (for a Qwen3 model, those its config
        // implies); a tied checkpoint may still carry the unused `lm_head.weight`.
        let mut expected: Vec<TensorSpec> = Vec::new();
        for w in &manifest.weights {
            if !expected.iter().any(|e| e.name == w.name) {
                expected.push(TensorSpec {
                    name: w.name.clone(),
                    shape: w.shape.clone(),
                });
            }
        }
        let tied = config.tie_word_embeddings;
        checkpoint
            .check_tensors(&expected, |name| {
                tied && name == q3c_models::tensors::LM_HEAD
            })
            .map_err(|e| RuntimeError::Weight {
                name: weights_dir.display().to_string(),
                message: format!(
                    "these weights are not for the model compiled into {}:\n{e}",
                    artifact.display()
                ),
            })?;
        // Check every weight and size its slot in the arena before filling anything.
        let mut tensors = Vec::with_capacity(manifest.weights.len());
        let mut sizes = Vec::with_capacity(manifest.weights.len());
        for w in &manifest.weights {
            let t = checkpoint
                .get(&w.name)
                .ok_or_else(|| RuntimeError::Weight {
                    name: w.name.clone(),
                    message: "missing from the checkpoint".into(),
                })?;
            if t.shape != w.shape.as_slice() {
                return Err(RuntimeError::Weight {
                    name: w.name.clone(),
                    message: format!(
                        "has shape {:?}, the artifact expects {:?}",
                        t.shape, w.shape
                    ),
                });
            }
            if t.dtype.name() != w.dtype {
                return Err(RuntimeError::Weight {
                    name: w.name.clone(),
                    message: format!("is {} in the checkpoint, the artifact was compiled for {}; recompile for these weights", t.dtype, w.dtype),
                });
            }
            let layout = q3c_abi::layout_for(&w.kernel_dtype);
            if w.layout != layout {
                return Err(artifact_err(
                    artifact,
                    format!(
                        "weight {} is laid out as {:?}; this runtime binds {} weights as {layout:?}",
                        w.name, w.layout, w.kernel_dtype
                    ),
                ));
            }
            let elements: usize = w.shape.iter().product();
            if let Some(packed) = t.packed {
                let size = bind_packed(w, packed, &t, residency).map_err(|message| {
                    RuntimeError::Weight {
                        name: w.name.clone(),
                        message,
                    }
                })?;
                tensors.push(t);
                sizes.push(size);
                continue;
            }
            let size = match w.kernel_dtype.as_str() {
                k if k == w.dtype => match residency {
                    Residency::Copied => t.bytes.len(),
                    Residency::Mapped => 0,
                },
                "f32" => elements * 4,
                format @ (q3c_abi::Q8_LAYOUT | q3c_abi::Q4_LAYOUT)
                    if w.shape.len() == 2
                        && w.shape[0] % q3c_ir::Q8_PANEL == 0
                        && w.shape[1] % q3c_ir::Q8_GROUP == 0 =>
                {
                    quant::packed_bytes(format, elements).expect("q8 or q4")
                }
                format @ (q3c_abi::Q8_LAYOUT | q3c_abi::Q4_LAYOUT) => {
                    return Err(artifact_err(
                        artifact,
                        format!(
                            "weight {} {:?} cannot be bound as {format} (it needs [n, k], n a multiple of {}, k of {})",
                            w.name,
                            w.shape,
                            q3c_ir::Q8_PANEL,
                            q3c_ir::Q8_GROUP
                        ),
                    ))
                }
                other => {
                    return Err(artifact_err(
                        artifact,
                        format!("weight {} has an unknown kernel dtype {other}", w.name),
                    ))
                }
            };
            tensors.push(t);
            sizes.push(size);
        }
        let mut arena = Arena::with_sizes(sizes).map_err(|e| {
            RuntimeError::Internal(format!("cannot allocate memory for the weights: {e}"))
        })?;
        let mut weight_ptrs = Vec::with_capacity(manifest.weights.len());
        let mut fills = Vec::new();
        for ((w, t), slot) in manifest.weights.iter().zip(&tensors).zip(arena.slots()) {
            // Bound in place: mapped weights the kernels read as stored (given no arena bytes).
            if residency == Residency::Mapped && slot.is_empty() {
                weight_ptrs.push(t.bytes.as_ptr());
            } else {
                weight_ptrs.push(slot.as_ptr());
                fills.push((w, t, slot));
            }
        }
        // Copying, widening and quantizing on every thread the model gets.
        let fills = Mutex::new(fills.into_iter());
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| loop {
                    let next = fills.lock().map(|mut it| it.next());
                    let Ok(Some((w, t, slot))) = next else {
                        return;
                    };
                    match w.kernel_dtype.as_str() {
                        _ if t.packed.is_some() => slot.copy_from_slice(t.bytes),
                        k if k == w.dtype => slot.copy_from_slice(t.bytes),
                        "f32" => {
                            for (d, v) in slot.chunks_exact_mut(4).zip(t.to_f32()) {
                                d.copy_from_slice(&v.to_ne_bytes());
                            }
                        }
                        format => {
                            let k = w.shape[1];
                            let row = |i, buf: &mut [f32]| t.widen_into(i * k, buf);
                            quant::quantize(format, w.shape[0], k, row, slot)
                        }
                    }
                });
            }
        });
        drop(tensors);
        // Copied weights no longer need the file mapping.
        let checkpoint = match residency {
            Residency::Mapped => Some(checkpoint),
            Residency::Copied => None,
        };
        Ok(CompiledModel {
            manifest,
            config,
            entry,
            weight_ptrs,
            _arena: arena,
            _checkpoint: checkpoint,
            pool: Mutex::new(Box::new(ThreadPool::new(threads))),
            _code: code,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// A session whose KV cache holds up to `capacity` tokens. The cache grows as tokens arrive (doubling,
    /// from [`INITIAL_ROWS`]), so a generous capacity costs memory only when used.
    pub fn session_with_capacity(&self, capacity: usize) -> CompiledSession<'_> {
        let scratch_len =
            self.manifest.scratch_bytes_per_token * self.manifest.max_tokens_per_call + 64;
        let mut session = CompiledSession {
            model: self,
            cache: vec![Vec::new(); 2 * self.manifest.kv.layers],
            rows: 0,
            capacity,
            scratch: vec![0u8; scratch_len],
            position: 0,
        };
        session.grow(capacity.min(INITIAL_ROWS));
        session
    }

    /// A session with the default capacity (4096 tokens, or the model's maximum if smaller).
    pub fn session(&self) -> CompiledSession<'_> {
        self.session_with_capacity(DEFAULT_CONTEXT.min(self.config.max_position_embeddings))
    }
}

/// One sequence on a compiled model: its own KV cache and scratch memory.
pub struct CompiledSession<'m> {
    model: &'m CompiledModel,
    cache: Vec<Vec<f32>>,
    /// Rows the cache buffers hold now.
    rows: usize,
    /// Rows they may grow to.
    capacity: usize,
    scratch: Vec<u8>,
    position: usize,
}

/// Rows a session's KV cache starts with.
const INITIAL_ROWS: usize = 256;

impl CompiledSession<'_> {
    /// Runs one call of at most `max_tokens_per_call` ids. `logits` holds one row per id, or one row when
    /// `last_only`.
    fn run_chunk(
        &mut self,
        ids: &[i32],
        logits: &mut [f32],
        last_only: bool,
    ) -> Result<(), RuntimeError> {
        let m = self.model;
        let pool = m
            .pool
            .lock()
            .map_err(|_| RuntimeError::Internal("thread pool poisoned".into()))?;
        let services = Services {
            parallel_for: pool::parallel_for,
            pool: &**pool as *const ThreadPool as *mut _,
        };
        let kv: Vec<*mut f32> = self.cache.iter_mut().map(|c| c.as_mut_ptr()).collect();
        let base = self.scratch.as_mut_ptr();
        let scratch = unsafe { base.add(base.align_offset(64)) };
        let step = Step {
            ids: ids.as_ptr(),
            t: ids.len() as u64,
            past: self.position as u64,
            weights: m.weight_ptrs.as_ptr(),
            kv: kv.as_ptr(),
            scratch,
            logits: logits.as_mut_ptr(),
            services: &services,
            last_logits_only: u64::from(last_only),
        };
        // SAFETY: every pointer in `step` is valid for the sizes the manifest specifies: weights were checked
        // against it, the cache holds past + t rows (grown by the caller, `run`), scratch and logits are
        // sized from the manifest.
        let status = match &m.entry {
            Entry::Forward(forward) => unsafe { forward(&step) },
            Entry::Launched(launcher) => unsafe { launcher.run(&step) },
        };
        match status {
            q3c_abi::OK => Ok(()),
            q3c_abi::ERR_TOKEN_ID => Err(RuntimeError::Input(format!(
                "a token id is outside the vocabulary (0..{})",
                m.manifest.vocab_size
            ))),
            q3c_abi::ERR_TOKENS => Err(RuntimeError::Internal(format!(
                "artifact refused a call of {} tokens",
                ids.len()
            ))),
            other => Err(RuntimeError::Internal(format!(
                "artifact returned status {other}"
            ))),
        }
    }
}

impl CompiledSession<'_> {
    /// Makes every cache buffer hold `rows` rows (the rows in use are kept).
    fn grow(&mut self, rows: usize) {
        // f32 words holding the rows' elements (checked at load to be f32 or f16).
        let words = (rows * self.model.manifest.kv.row_bytes()).div_ceil(4);
        for c in &mut self.cache {
            c.resize(words, 0.0);
        }
        self.rows = rows;
    }

    /// Checks ids and capacity, then runs them in calls of at most `max_tokens_per_call`, writing each
    /// call's logits into `out` (one row per id, or only the last id's row when `last_only`).
    fn run(&mut self, ids: &[u32], last_only: bool, out: &mut [f32]) -> Result<(), RuntimeError> {
        let vocab = self.model.manifest.vocab_size;
        if ids.is_empty() {
            return Err(RuntimeError::Input("no token ids to run".into()));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(RuntimeError::Input(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        let needed = self.position + ids.len();
        if needed > self.capacity {
            return Err(RuntimeError::Input(format!(
                "context full: {} cached + {} new tokens exceed the session's capacity of {}",
                self.position,
                ids.len(),
                self.capacity
            )));
        }
        if needed > self.rows {
            self.grow(needed.max(2 * self.rows).min(self.capacity));
        }
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let start = self.position;
        let chunk = self.model.manifest.max_tokens_per_call;
        for (c, part) in ids.chunks(chunk).enumerate() {
            // With last_only every call writes its last row over row 0; the final call's is the answer.
            let rows = if last_only {
                &mut out[..vocab]
            } else {
                &mut out[c * chunk * vocab..][..part.len() * vocab]
            };
            if let Err(e) = self.run_chunk(part, rows, last_only) {
                // Cache rows past `start` are simply overwritten by the next call.
                self.position = start;
                return Err(e);
            }
            self.position += part.len();
        }
        Ok(())
    }
}

impl Session for CompiledSession<'_> {
    fn forward(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        let vocab = self.model.manifest.vocab_size;
        let mut data = vec![0f32; ids.len() * vocab];
        self.run(ids, false, &mut data)?;
        Ok(Logits {
            rows: ids.len(),
            vocab,
            data,
        })
    }

    fn forward_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let mut row = vec![0f32; self.model.manifest.vocab_size];
        self.run(ids, true, &mut row)?;
        Ok(row)
    }

    fn position(&self) -> usize {
        self.position
    }

    fn reset(&mut self) {
        self.position = 0;
    }

    fn truncate(&mut self, len: usize) {
        // Rows past `len` are overwritten by the next call.
        self.position = self.position.min(len);
    }

    fn vocab_size(&self) -> usize {
        self.model.manifest.vocab_size
    }
}

/// The arena bytes a pre-quantized checkpoint tensor `t` takes for weight `w` (none when mapped in place),
/// or why it cannot be bound: packed in another format or layout than the artifact reads, or holding fewer
/// or more bytes than its shape needs (a truncated or foreign file).
fn bind_packed(
    w: &q3c_abi::WeightEntry,
    packed: &q3c_models::Packed,
    t: &q3c_models::TensorRef,
    residency: Residency,
) -> Result<usize, String> {
    if packed.format != w.kernel_dtype || packed.layout != w.layout {
        let hint = match w.kernel_dtype.as_str() {
            q3c_abi::Q8_LAYOUT | q3c_abi::Q4_LAYOUT => {
                format!("the artifact reads it as {}", w.kernel_dtype)
            }
            _ => "the artifact reads it unquantized".to_string(),
        };
        return Err(format!(
            "is pre-quantized as {} ({}) in the checkpoint, but {hint} ({}): compile with --quantize {}",
            packed.format, packed.layout, w.layout, packed.format
        ));
    }
    let elements: usize = w.shape.iter().product();
    let want = quant::packed_bytes(&packed.format, elements).ok_or_else(|| {
        format!(
            "is pre-quantized as {}, which this runtime does not know",
            packed.format
        )
    })?;
    if t.bytes.len() != want {
        return Err(format!(
            "holds {} packed bytes, {} {:?} needs {want} (truncated or written for another shape)",
            t.bytes.len(),
            packed.format,
            w.shape
        ));
    }
    // The kernels load 4-byte words (and 2-byte scales) of a packed matrix: one not 4-byte aligned in the
    // file is copied, whatever the residency.
    let aligned = (t.bytes.as_ptr() as usize).is_multiple_of(4);
    Ok(match residency {
        Residency::Mapped if aligned => 0,
        _ => t.bytes.len(),
    })
}
