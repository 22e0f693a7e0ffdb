//! Running compiled artifacts: load a `.so`, check it, bind weights, and open sessions on it.
//!
//! Loading checks, in order and before any artifact code runs: the file is a shared library, it exports the
//! q3c symbols, its ABI version is ours, its manifest parses, this CPU has the features it was compiled
//! for, and the checkpoint holds exactly the weights the manifest lists (names, shapes, dtypes).

mod arena;
#[cfg(feature = "cuda")]
mod cuda;
mod elf;
mod kv;
mod launcher;
mod pool;
pub mod quant;
mod ranks;
mod sequences;

use std::path::Path;
use std::sync::{Arc, Mutex};

use q3c_abi::launch::LaunchedKernel;
use q3c_abi::{Forward, Manifest, ABI_VERSION};
use q3c_models::tensors::TensorSpec;
use q3c_models::{Checkpoint, Qwen3Config, TensorRef};

use arena::Arena;
pub use arena::Residency;
pub use pool::ThreadPool;
pub use ranks::{CollectiveStats, ThreadTransport, Transport};
pub use sequences::{CompiledBatch, CompiledSession};

use crate::error::RuntimeError;

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
    /// The other ranks of a sharded model.
    link: Option<Arc<ranks::Link>>,
    /// What keeps the code alive: the loaded library, or in-process JIT memory.
    _code: Box<dyn std::any::Any + Send + Sync>,
}

/// How a forward call enters the artifact.
enum Entry {
    /// Its own `q3c_forward`.
    Forward(Forward),
    /// The runtime launches its kernels ([`launcher::Launcher`]).
    Launched(launcher::Launcher),
    /// A CUDA artifact: its kernels run on the GPU.
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::Gpu>),
}

/// Whether this build can run CUDA artifacts and this machine has an NVIDIA driver to run them with.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    return cuda::driver_present();
    #[cfg(not(feature = "cuda"))]
    false
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

/// Reads the ABI version and manifest of an artifact (a `.so` or a CUDA artifact) without binding anything.
pub fn read_manifest(path: &Path) -> Result<Manifest, RuntimeError> {
    let bytes = read_artifact(path)?;
    if q3c_abi::cuda::is_cuda_artifact(&bytes) {
        return read_cuda(path, &bytes).map(|(manifest, _)| manifest);
    }
    let lib = open_library(path, &bytes)?;
    let manifest = check_library(path, &lib)?;
    Ok(manifest)
}

fn read_artifact(path: &Path) -> Result<Vec<u8>, RuntimeError> {
    if !path.is_file() {
        return Err(artifact_err(path, "no such file"));
    }
    std::fs::read(path).map_err(|e| artifact_err(path, format!("cannot read: {e}")))
}

/// The manifest and PTX of a CUDA artifact, checked as a `.so`'s are.
fn read_cuda<'a>(path: &Path, bytes: &'a [u8]) -> Result<(Manifest, &'a [u8]), RuntimeError> {
    let artifact = q3c_abi::cuda::decode(bytes).map_err(|why| artifact_err(path, why))?;
    let manifest = check_manifest(path, artifact.abi_version, artifact.manifest)?;
    if manifest.launch.is_none() {
        return Err(artifact_err(path, "a CUDA artifact without a launch plan"));
    }
    Ok((manifest, artifact.ptx))
}

/// Loads the shared library at `path`, whose contents are `bytes`, once they are checked as an ELF object.
fn open_library(path: &Path, bytes: &[u8]) -> Result<libloading::Library, RuntimeError> {
    elf::check(bytes)
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
    check_version(path, version)?;
    let len = unsafe { lib.get::<*const u64>(q3c_abi::SYM_MANIFEST_LEN.as_bytes()) }
        .map_err(|_| not_q3c(q3c_abi::SYM_MANIFEST_LEN))?;
    let data = unsafe { lib.get::<*const u8>(q3c_abi::SYM_MANIFEST.as_bytes()) }
        .map_err(|_| not_q3c(q3c_abi::SYM_MANIFEST))?;
    let bytes = unsafe { std::slice::from_raw_parts(*data, **len as usize) };
    check_manifest(path, version, bytes)
}

fn check_version(path: &Path, version: u32) -> Result<(), RuntimeError> {
    if version != ABI_VERSION {
        return Err(artifact_err(
            path,
            format!("built for q3c ABI version {version}, this runtime speaks version {ABI_VERSION}; recompile it with this q3c"),
        ));
    }
    Ok(())
}

/// The manifest of an artifact of ABI `version`, checked: ours, parseable, a KV type this runtime holds.
fn check_manifest(path: &Path, version: u32, bytes: &[u8]) -> Result<Manifest, RuntimeError> {
    check_version(path, version)?;
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
    if !q3c_abi::KV_DTYPES.contains(&manifest.kv.dtype.as_str()) {
        return Err(artifact_err(
            path,
            format!(
                "the manifest's KV cache is {}; this runtime holds {} caches",
                manifest.kv.dtype,
                q3c_abi::KV_DTYPES.join(", ")
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
        "avx512ifma" => has!("avx512ifma"),
        "avx512vbmi2" => has!("avx512vbmi2"),
        "avx512vpopcntdq" => has!("avx512vpopcntdq"),
        "avx512fp16" => has!("avx512fp16"),
        "gfni" => has!("gfni"),
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
        Self::load_bound(
            artifact,
            Binding {
                weights_dir,
                threads,
                residency,
                link: None,
            },
        )
    }

    /// Loads rank `transport.rank()` of a model sharded over `transport.ranks()` processes: binds this
    /// rank's slice of the weights in `weights_dir`. Rank 0 then runs it as any model; every other rank
    /// calls [`CompiledModel::follow`].
    pub fn load_rank(
        artifact: &Path,
        weights_dir: &Path,
        threads: usize,
        transport: Arc<dyn Transport>,
    ) -> Result<CompiledModel, RuntimeError> {
        Self::load_bound(
            artifact,
            Binding {
                weights_dir,
                threads,
                residency: Residency::Copied,
                link: Some(Arc::new(ranks::Link::new(transport))),
            },
        )
    }

    /// The rank of a sharded model this is (0 for a model that is not sharded).
    pub fn rank(&self) -> usize {
        self.link.as_ref().map_or(0, |l| l.rank())
    }

    fn load_bound(artifact: &Path, binding: Binding) -> Result<CompiledModel, RuntimeError> {
        let bytes = read_artifact(artifact)?;
        if q3c_abi::cuda::is_cuda_artifact(&bytes) {
            return Self::load_cuda(artifact, &bytes, binding);
        }
        let library = open_library(artifact, &bytes)?;
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
        Self::bind(artifact, manifest, entry, Box::new(library), binding)
    }

    /// Loads a CUDA artifact onto the first GPU and binds the weights there (uploaded in one copy; the host
    /// copy is dropped).
    #[cfg(feature = "cuda")]
    fn load_cuda(
        artifact: &Path,
        bytes: &[u8],
        binding: Binding,
    ) -> Result<CompiledModel, RuntimeError> {
        let (manifest, ptx) = read_cuda(artifact, bytes)?;
        let gpu = cuda::Gpu::open(&manifest, ptx)?;
        let binding = Binding {
            residency: Residency::Copied,
            ..binding
        };
        let mut model = Self::bind(
            artifact,
            manifest,
            Entry::Cuda(Box::new(gpu)),
            Box::new(()),
            binding,
        )?;
        if let Entry::Cuda(gpu) = &mut model.entry {
            gpu.upload_weights(model._arena.bytes(), &mut model.weight_ptrs)?;
        }
        model._arena = Arena::with_sizes(Vec::new())
            .map_err(|e| RuntimeError::Internal(format!("an empty arena: {e}")))?;
        Ok(model)
    }

    #[cfg(not(feature = "cuda"))]
    fn load_cuda(artifact: &Path, bytes: &[u8], _: Binding) -> Result<CompiledModel, RuntimeError> {
        read_cuda(artifact, bytes)?;
        Err(artifact_err(
            artifact,
            "a CUDA artifact, and this q3c was built without CUDA support (build it with --features cuda)",
        ))
    }

    /// The GPU running this model, if it runs on one (`NAME (sm_XY)`).
    pub fn gpu(&self) -> Option<&str> {
        match &self.entry {
            #[cfg(feature = "cuda")]
            Entry::Cuda(gpu) => Some(&gpu.name),
            _ => None,
        }
    }

    /// An empty KV pool's memory, where this model's kernels read it.
    fn kv_memory(&self) -> Box<dyn kv::KvMemory> {
        match &self.entry {
            #[cfg(feature = "cuda")]
            Entry::Cuda(gpu) => gpu.kv_memory(&self.manifest.kv),
            _ => match &self.link {
                Some(link) if link.rank() == 0 => Box::new(link.mirrored_kv(&self.manifest.kv)),
                _ => Box::new(kv::HostKv::new(&self.manifest.kv)),
            },
        }
    }

    /// Bytes of host scratch memory a forward call needs (none where the kernels run on a GPU).
    fn host_scratch_bytes(&self) -> usize {
        match &self.entry {
            #[cfg(feature = "cuda")]
            Entry::Cuda(_) => 0,
            _ => self.manifest.scratch_bytes_per_token * self.manifest.max_tokens_per_call,
        }
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
            Binding {
                weights_dir,
                threads,
                residency,
                link: None,
            },
        )
    }

    fn bind(
        artifact: &Path,
        manifest: Manifest,
        entry: Entry,
        code: Box<dyn std::any::Any + Send + Sync>,
        binding: Binding,
    ) -> Result<CompiledModel, RuntimeError> {
        let Binding {
            weights_dir,
            threads,
            residency,
            link,
        } = binding;
        let config = Qwen3Config::from_json(&manifest.config.to_string())
            .map_err(|e| artifact_err(artifact, format!("manifest config: {e}")))?;
        let ranks = link.as_ref().map_or(1, |l| l.ranks());
        if manifest.ranks != ranks {
            let message = match (manifest.ranks, ranks) {
                (1, _) => format!("a model for one process, and this job has {ranks} ranks: compile it with --shards {ranks}, or run it without mpirun"),
                (n, 1) => format!("sharded over {n} ranks: run it as `mpirun -np {n} q3c ...`"),
                (n, _) => format!("sharded over {n} ranks, and this job has {ranks}: run it with mpirun -np {n}"),
            };
            return Err(artifact_err(artifact, message));
        }
        let rank = link.as_ref().map_or(0, |l| l.rank());
        for w in &manifest.weights {
            if let Some(s) = w.shard {
                if s.ranks != manifest.ranks
                    || s.axis >= w.shape.len()
                    || s.parts == 0
                    || s.parts > s.ranks
                {
                    return Err(artifact_err(
                        artifact,
                        format!("weight {} has a malformed shard {s:?}", w.name),
                    ));
                }
            }
            if let Some(o) = w.owner {
                if o.ranks != manifest.ranks
                    || o.parts == 0
                    || o.parts > o.ranks
                    || o.part >= o.parts
                {
                    return Err(artifact_err(
                        artifact,
                        format!("weight {} has a malformed owner {o:?}", w.name),
                    ));
                }
            }
        }
        // An expert other ranks hold is not bound here: a null table entry, which no kernel reads.
        let binds = |w: &q3c_abi::WeightEntry| w.owner.is_none_or(|o| o.binds(rank));
        let checkpoint = Checkpoint::open(weights_dir)?;
        // The manifest lists exactly the tensors the graph reads (for a Qwen3 model, those its config
        // implies; whole, where a rank binds a slice); a tied checkpoint may still carry the unused
        // `lm_head.weight`.
        let mut expected: Vec<TensorSpec> = Vec::new();
        for w in &manifest.weights {
            if !expected.iter().any(|e| e.name == w.name) {
                expected.push(TensorSpec {
                    name: w.name.clone(),
                    shape: stored_shape(w),
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
            if t.shape != stored_shape(w).as_slice() {
                return Err(RuntimeError::Weight {
                    name: w.name.clone(),
                    message: format!(
                        "has shape {:?}, the artifact expects {:?}",
                        t.shape,
                        stored_shape(w)
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
            if !binds(w) {
                tensors.push(t);
                sizes.push(0);
                continue;
            }
            let elements: usize = w.shape.iter().product();
            if let (Some(_), Some(_)) = (w.shard, t.packed) {
                return Err(RuntimeError::Weight {
                    name: w.name.clone(),
                    message: "is pre-quantized, and a sharded model binds slices of plain tensors: give it the bf16 checkpoint (the artifact quantizes what it was compiled to)".into(),
                });
            }
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
                    // A slice is copied out of the tensor.
                    Residency::Mapped if w.shard.is_none() => 0,
                    _ => elements * t.dtype.size(),
                },
                "f32" => elements * 4,
                format
                    if q3c_abi::PACKED_FORMATS.contains(&format)
                        && w.shape.len() == 2
                        && w.shape[0] % q3c_ir::Q8_PANEL == 0
                        && w.shape[1] % q3c_ir::Q8_GROUP == 0 =>
                {
                    quant::packed_bytes(format, elements).expect("a packed format")
                }
                format if q3c_abi::PACKED_FORMATS.contains(&format) => {
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
            if !binds(w) {
                weight_ptrs.push(std::ptr::null());
            } else if residency == Residency::Mapped && slot.is_empty() {
                // Bound in place: mapped weights the kernels read as stored (given no arena bytes).
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
                    // This rank's slice of a sharded weight.
                    let sliced;
                    let t = match w.shard {
                        Some(shard) => {
                            let len = w.shape[shard.axis];
                            sliced = t.slice_bytes(shard.axis, shard.part(rank) * len, len);
                            TensorRef {
                                shape: &w.shape,
                                bytes: &sliced,
                                ..*t
                            }
                        }
                        None => *t,
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
            link,
            _code: code,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Threads a forward call runs on.
    pub fn threads_per_call(&self) -> usize {
        self.pool.lock().map_or(1, |p| p.threads())
    }

    /// Bytes of the weights bound in host memory (this rank's slices, for a sharded model; weights read in
    /// place from the checkpoint's mapping, or uploaded to a GPU, are not counted).
    pub fn weight_bytes(&self) -> usize {
        self._arena.bytes().len()
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// The thread pool, for one forward pass at a time.
    fn threads(&self) -> Result<std::sync::MutexGuard<'_, Box<ThreadPool>>, RuntimeError> {
        self.pool
            .lock()
            .map_err(|_| RuntimeError::Internal("thread pool poisoned".into()))
    }
}

/// How a model binds its weights, besides what its artifact says.
struct Binding<'a> {
    weights_dir: &'a Path,
    threads: usize,
    residency: Residency,
    /// The other ranks, for a sharded model.
    link: Option<Arc<ranks::Link>>,
}

/// A weight's shape in the checkpoint (whole, where the artifact binds a slice of it).
fn stored_shape(w: &q3c_abi::WeightEntry) -> Vec<usize> {
    w.shard.map_or(w.shape.clone(), |s| s.full_shape(&w.shape))
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
        // The `--quantize` format whose artifacts read this tensor as packed (a q6 tensor is the logits
        // matrix of a q4 model).
        let flag = match packed.format.as_str() {
            q3c_abi::Q6_LAYOUT => q3c_abi::Q4_LAYOUT,
            f => f,
        };
        let hint = match w.kernel_dtype.as_str() {
            k if q3c_abi::PACKED_FORMATS.contains(&k) => format!(
                "the artifact reads it as {k} ({}): compile with --quantize {flag}, or quantize the \
                 original checkpoint again with this q3c",
                w.layout
            ),
            _ => format!(
                "the artifact reads it unquantized ({}): compile with --quantize {flag}",
                w.layout
            ),
        };
        return Err(format!(
            "is pre-quantized as {} ({}) in the checkpoint, but {hint}",
            packed.format, packed.layout
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
