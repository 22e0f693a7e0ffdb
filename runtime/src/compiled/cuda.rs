//! Running a CUDA artifact (`q3c_abi::cuda`) on an NVIDIA GPU, through the CUDA driver API (cudarc, with
//! the driver library loaded at run time, so q3c builds and starts on machines without one).
//!
//! Loading retains the first device's primary context, has the driver compile the PTX, finds every kernel
//! of the launch plan, and uploads the bound weights in one copy. Each forward call packs the step — the
//! rows' ids, positions and sequences, each sequence's block table, the logit rows, the `q3c_step` itself
//! with device addresses, and every dispatch's argument block — into one host buffer, copies it to the
//! device in one transfer, launches the plan's dispatches in order on one stream, and copies back only the
//! logit rows asked for. The KV pool's buffers live on the device ([`DeviceKv`]). With `Q3C_CUDA_PROFILE`
//! set, every dispatch is timed by CUDA events and the time per kernel printed when the model is dropped.

use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};
use q3c_abi::launch::{Arg, LaunchPlan};
use q3c_abi::{KvGeometry, Manifest, Step, KV_BLOCK_TOKENS};

use super::kv::KvMemory;
use super::launcher::{arguments, check_step};
use crate::error::RuntimeError;

fn gpu_err(what: &str, e: result::DriverError) -> RuntimeError {
    RuntimeError::Gpu(format!("{what}: {e}"))
}

/// The device's primary context, made current on whichever thread uses it.
struct Context {
    ctx: sys::CUcontext,
    device: sys::CUdevice,
}

// SAFETY: a CUDA context may be used from any thread once made current there (every use binds it first).
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    fn bind(&self) -> Result<(), RuntimeError> {
        // SAFETY: the context was retained and is released only on drop.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| gpu_err("binding the context", e))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: retained once in `Gpu::open`.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

/// Device memory, zeroed when allocated, freed on drop.
struct DevBuf {
    ctx: Arc<Context>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DevBuf {
    fn new(ctx: &Arc<Context>, bytes: usize) -> Result<DevBuf, RuntimeError> {
        ctx.bind()?;
        let ptr = match bytes {
            0 => 0,
            // SAFETY: a plain allocation in the current context, then filled with zeros.
            _ => unsafe {
                let ptr = result::malloc_sync(bytes).map_err(|e| {
                    gpu_err(&format!("allocating {bytes} bytes of device memory"), e)
                })?;
                // The zeros land before any stream uses the buffer.
                if let Err(e) =
                    result::memset_d8_sync(ptr, 0, bytes).and_then(|_| result::ctx::synchronize())
                {
                    let _ = result::free_sync(ptr);
                    return Err(gpu_err("zeroing device memory", e));
                }
                ptr
            },
        };
        Ok(DevBuf {
            ctx: ctx.clone(),
            ptr,
            bytes,
        })
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 && self.ctx.bind().is_ok() {
            // SAFETY: allocated in `new`, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A CUDA artifact loaded on the GPU: its kernels, its weights, and the device memory of one call at a time.
pub(crate) struct Gpu {
    /// `NAME (sm_XY)`, for messages.
    pub(crate) name: String,
    plan: LaunchPlan,
    kernels: Vec<sys::CUfunction>,
    /// Which launches are programmatic (where the plan's kernels allow it): each kernel's blocks may start
    /// while the one before finishes.
    programmatic: Programmatic,
    module: sys::CUmodule,
    max_tokens: usize,
    vocab: usize,
    kv_slots: usize,
    /// Each weight's device address, and the device table of them (`q3c_step.weights`).
    weight_addrs: Vec<u64>,
    weights: Option<DevBuf>,
    table: Option<DevBuf>,
    call: Mutex<CallMemory>,
    ctx: Arc<Context>,
}

/// What one forward call uses on the device: scratch, logits, and the area its step is copied into.
struct CallMemory {
    scratch: DevBuf,
    logits: DevBuf,
    area: DevBuf,
    host: Vec<u8>,
    /// With `Q3C_CUDA_PROFILE` set: every dispatch timed by events, summed per kernel.
    profile: Option<Profile>,
    /// The stream calls run on.
    stream: sys::CUstream,
    /// Captured calls of few rows, by (area address, rows, logit rows): see [`GRAPH_ROWS`].
    graphs: std::collections::HashMap<(u64, u64, u64), sys::CUgraphExec>,
    /// Whether to capture graphs (`Q3C_CUDA_GRAPHS=0` turns them off, to compare).
    graphs_wanted: bool,
}

/// Time per kernel over the calls of a model (`Q3C_CUDA_PROFILE=1`), printed when the model is dropped.
struct Profile {
    /// One event before each dispatch and one after the last.
    events: Vec<sys::CUevent>,
    /// Per kernel of the plan: milliseconds and launches.
    totals: Vec<(f64, usize)>,
    calls: usize,
}

impl Profile {
    fn new(dispatches: usize, kernels: usize) -> Result<Profile, RuntimeError> {
        let events = (0..=dispatches)
            .map(|_| result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .collect::<Result<_, _>>()
            .map_err(|e| gpu_err("creating profiling events", e))?;
        Ok(Profile {
            events,
            totals: vec![(0.0, 0); kernels],
            calls: 0,
        })
    }

    /// Adds the times between the events of the call just finished (`kernels[i]` ran between events i
    /// and i + 1).
    fn add(&mut self, kernels: &[usize]) {
        for (i, &k) in kernels.iter().enumerate() {
            // SAFETY: events recorded in this call, which has finished (its copy back returned).
            if let Ok(ms) = unsafe { result::event::elapsed(self.events[i], self.events[i + 1]) } {
                self.totals[k].0 += f64::from(ms);
                self.totals[k].1 += 1;
            }
        }
        self.calls += 1;
    }

    fn report(&self, names: &[String]) -> String {
        let total: f64 = self.totals.iter().map(|t| t.0).sum();
        let mut rows: Vec<_> = names.iter().zip(&self.totals).collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let mut out = format!(
            "GPU kernel time over {} calls: {total:.3} ms in all\n",
            self.calls
        );
        for (name, (ms, n)) in rows.iter().take(20).filter(|r| r.1 .1 > 0) {
            out += &format!(
                "{:>9.3} ms {:>5.1}% {n:>7} launches  {name}\n",
                ms,
                100.0 * ms / total.max(1e-9)
            );
        }
        out
    }
}

// SAFETY: module and function handles are plain driver handles usable from any thread with the context
// current; a call's memory is used under its mutex.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

/// Whether an NVIDIA driver can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// `sm_XY` as (X, Y).
fn compute_capability(arch: &str) -> Option<(i32, i32)> {
    let digits = arch.strip_prefix("sm_")?.trim_end_matches('a');
    let n: i32 = digits.parse().ok()?;
    Some((n / 10, n % 10))
}

impl Gpu {
    /// Opens the first GPU and loads `ptx` (NUL-terminated) compiled for `manifest`. Errors are messages
    /// about this machine or the artifact, for the caller to attribute.
    pub(crate) fn open(manifest: &Manifest, ptx: &[u8]) -> Result<Gpu, RuntimeError> {
        let plan = manifest.launch.clone().ok_or_else(|| {
            RuntimeError::Internal("a CUDA artifact without a launch plan".into())
        })?;
        if !driver_present() {
            return Err(RuntimeError::Gpu(
                "no NVIDIA driver found (libcuda.so.1 could not be loaded): a CUDA artifact runs on an NVIDIA GPU".into(),
            ));
        }
        result::init().map_err(|e| gpu_err("the CUDA driver failed to start", e))?;
        let count = result::device::get_count().map_err(|e| gpu_err("counting GPUs", e))?;
        if count == 0 {
            return Err(RuntimeError::Gpu("no NVIDIA GPU found".into()));
        }
        let device = result::device::get(0).map_err(|e| gpu_err("opening GPU 0", e))?;
        let attribute = |a| {
            // SAFETY: a device from `get`.
            unsafe { result::device::get_attribute(device, a) }
                .map_err(|e| gpu_err("reading the GPU's attributes", e))
        };
        use sys::CUdevice_attribute as A;
        let have = (
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let gpu_name = result::device::get_name(device).unwrap_or_else(|_| "GPU".into());
        let name = format!("{gpu_name} (sm_{}{})", have.0, have.1);
        let want = compute_capability(&manifest.target_cpu).ok_or_else(|| {
            RuntimeError::Internal(format!(
                "unknown GPU architecture {:?}",
                manifest.target_cpu
            ))
        })?;
        if have < want {
            return Err(RuntimeError::Gpu(format!(
                "the artifact was compiled for {}, which {name} cannot run; recompile with --gpu sm_{}{}",
                manifest.target_cpu, have.0, have.1
            )));
        }
        // SAFETY: retained here, released when the context drops.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| gpu_err("creating a context", e))?;
        let ctx = Arc::new(Context { ctx, device });
        ctx.bind()?;
        // SAFETY: the PTX is NUL-terminated text (checked by `q3c_abi::cuda::decode`).
        let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }
            .map_err(|e| gpu_err("the driver could not load the artifact's PTX", e))?;
        let mut kernels = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            let name = CString::new(k.as_str())
                .map_err(|_| RuntimeError::Internal(format!("kernel name {k:?}")))?;
            // SAFETY: a module loaded above.
            kernels.push(
                unsafe { result::module::get_function(module, name) }
                    .map_err(|e| gpu_err(&format!("the PTX has no kernel {k}"), e))?,
            );
        }
        let max_tokens = manifest.max_tokens_per_call;
        let call = CallMemory {
            scratch: DevBuf::new(&ctx, manifest.scratch_bytes_per_token * max_tokens)?,
            logits: DevBuf::new(&ctx, 4 * max_tokens * manifest.vocab_size)?,
            area: DevBuf::new(&ctx, 0)?,
            host: Vec::new(),
            profile: match std::env::var_os("Q3C_CUDA_PROFILE") {
                Some(_) => Some(Profile::new(plan.dispatches.len(), plan.kernels.len())?),
                None => None,
            },
            stream: result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(|e| gpu_err("creating a stream", e))?,
            graphs: std::collections::HashMap::new(),
            graphs_wanted: std::env::var("Q3C_CUDA_GRAPHS").map_or(true, |v| v != "0"),
        };
        let programmatic = match plan.programmatic {
            true => Programmatic::from_env(),
            false => Programmatic::Off,
        };
        Ok(Gpu {
            name,
            plan,
            kernels,
            programmatic,
            module,
            max_tokens,
            vocab: manifest.vocab_size,
            kv_slots: 2 * manifest.kv.layers,
            weight_addrs: Vec::new(),
            weights: None,
            table: None,
            call: Mutex::new(call),
            ctx,
        })
    }

    /// Uploads the bound weights, `arena` holding every one of them at the addresses `ptrs` lists, and
    /// rewrites `ptrs` to their device addresses.
    pub(crate) fn upload_weights(
        &mut self,
        arena: &[u8],
        ptrs: &mut [*const u8],
    ) -> Result<(), RuntimeError> {
        let weights = DevBuf::new(&self.ctx, arena.len())?;
        if !arena.is_empty() {
            // SAFETY: the buffer holds arena.len() bytes.
            unsafe { result::memcpy_htod_sync(weights.ptr, arena) }
                .map_err(|e| gpu_err("uploading the weights", e))?;
        }
        let base = arena.as_ptr() as usize;
        let mut addrs = Vec::with_capacity(ptrs.len());
        for p in ptrs.iter_mut() {
            let offset = (*p as usize)
                .checked_sub(base)
                .filter(|&o| o <= arena.len())
                .ok_or_else(|| {
                    RuntimeError::Internal("a GPU weight bound outside the arena".into())
                })?;
            let addr = weights.ptr + offset as u64;
            addrs.push(addr);
            *p = addr as *const u8;
        }
        let table = DevBuf::new(&self.ctx, 8 * addrs.len())?;
        if !addrs.is_empty() {
            // SAFETY: the table holds one word per weight.
            unsafe { result::memcpy_htod_sync(table.ptr, &addrs) }
                .map_err(|e| gpu_err("uploading the weight table", e))?;
        }
        self.weight_addrs = addrs;
        self.weights = Some(weights);
        self.table = Some(table);
        Ok(())
    }

    /// An empty KV pool's memory on this GPU.
    pub(crate) fn kv_memory(&self, kv: &KvGeometry) -> Box<dyn KvMemory> {
        Box::new(DeviceKv {
            ctx: self.ctx.clone(),
            buffers: Vec::new(),
            count: 2 * kv.layers,
            bytes: 0,
        })
    }

    /// Runs one forward call: `step` is as for `q3c_forward`, in host memory, except that `step.kv` lists
    /// this GPU's KV buffers ([`Gpu::kv_memory`]); the logits land in `step.logits` (host). Returns the
    /// ABI status, or the GPU's failure.
    ///
    /// # Safety
    /// Every host pointer of `step` must be valid for the sizes the manifest specifies (as for
    /// `q3c_forward`), each sequence's block table covering the positions of its rows.
    pub(crate) unsafe fn run(&self, step: &Step) -> Result<i32, RuntimeError> {
        // SAFETY: as for this function.
        let n_logits = match unsafe { check_step(step, self.max_tokens, self.vocab) } {
            Ok(n) => n,
            Err(status) => return Ok(status),
        };
        let mut call = self
            .call
            .lock()
            .map_err(|_| RuntimeError::Internal("GPU call memory poisoned".into()))?;
        self.ctx.bind()?;
        let t = step.t as usize;
        // SAFETY: the step's arrays hold t rows, n_seqs sequences, n_logits rows and kv_slots buffers.
        let (ids, pos, seq_of, seqs, kv) = unsafe {
            (
                std::slice::from_raw_parts(step.ids, t),
                std::slice::from_raw_parts(step.pos, t),
                std::slice::from_raw_parts(step.seq, t),
                std::slice::from_raw_parts(step.seqs, step.n_seqs as usize),
                std::slice::from_raw_parts(step.kv, self.kv_slots),
            )
        };
        let logit_rows = match step.logit_rows.is_null() {
            true => None,
            // SAFETY: as above.
            false => Some(unsafe { std::slice::from_raw_parts(step.logit_rows, n_logits) }),
        };
        // Each sequence's block table covers its last row's position.
        let mut tables = Vec::with_capacity(seqs.len());
        for s in seqs {
            let last = (s.end as usize).checked_sub(1).filter(|&r| r < t);
            let Some(last) = last else {
                return Ok(q3c_abi::ERR_TOKENS);
            };
            let blocks = pos[last] as usize / KV_BLOCK_TOKENS + 1;
            // SAFETY: the caller's block table covers the positions of its rows.
            tables.push(unsafe { std::slice::from_raw_parts(s.blocks, blocks) });
        }

        // Everything the kernels read for this call, laid out in one buffer: sizes first, to place it.
        let words = |n: usize| n.div_ceil(2);
        let step_words = std::mem::size_of::<Step>() / 8;
        let data_words = step_words
            + self.kv_slots
            + 3 * words(t)
            + words(n_logits)
            + tables.iter().map(|b| words(b.len())).sum::<usize>()
            + 2 * seqs.len()
            + self
                .plan
                .dispatches
                .iter()
                .map(|d| 2 + d.args.len())
                .sum::<usize>();
        if call.area.bytes < 8 * data_words {
            // Graphs captured with the old area's addresses go with it.
            call.drop_graphs();
            call.area = DevBuf::new(&self.ctx, (8 * data_words).next_power_of_two())?;
        }
        let (base, scratch, logits) = (call.area.ptr, call.scratch.ptr, call.logits.ptr);
        let mut area = Area::new(&mut call.host, base);
        area.skip(step_words);
        // The argument blocks next, at offsets that depend on the plan alone (a captured graph keeps
        // their addresses), then the rows' data.
        let mut block_word = Vec::with_capacity(self.plan.dispatches.len());
        for d in &self.plan.dispatches {
            block_word.push(area.words());
            area.skip(2 + d.args.len());
        }
        let kv_at = area.u64s(&kv.iter().map(|&p| p as u64).collect::<Vec<_>>());
        let ids_at = area.u32s(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>());
        let pos_at = area.u32s(pos);
        let seq_at = area.u32s(seq_of);
        let rows_at = logit_rows.map_or(0, |r| area.u32s(r));
        let table_at: Vec<u64> = tables.iter().map(|b| area.u32s(b)).collect();
        let seqs_at = area.u64s(
            &seqs
                .iter()
                .zip(&table_at)
                .flat_map(|(s, &at)| [at, s.end])
                .collect::<Vec<_>>(),
        );
        let table = self.table.as_ref().map_or(0, |t| t.ptr);
        area.set_u64s(
            0,
            &[
                ids_at,
                t as u64,
                pos_at,
                seq_at,
                seqs_at,
                seqs.len() as u64,
                table,
                kv_at,
                scratch,
                logits,
                0,
                rows_at,
                if logit_rows.is_some() {
                    n_logits as u64
                } else {
                    0
                },
            ],
        );
        let mut launches = Vec::with_capacity(self.plan.dispatches.len());
        let mut block = Vec::new();
        for (d, &word) in self.plan.dispatches.iter().zip(&block_word) {
            let (items, kernel) = arguments(d, step, n_logits, base, &mut block, |a| match a {
                Arg::Weight(index) => self.weight_addrs[index],
                Arg::WeightTable(index) => table + 8 * index as u64,
                Arg::Ids => ids_at,
                Arg::Scratch(offset) => scratch + offset as u64,
                Arg::Cache(slot) => kv[slot] as u64,
                Arg::Logits => logits,
            });
            area.set_u64s(word, &block);
            if items > 0 {
                let grid = d.grid(items, self.plan.threads_per_block);
                launches.push(Launch {
                    kernel,
                    args: base + 8 * word as u64,
                    items: items as u64,
                    grid,
                });
            }
        }
        let bytes = area.finish();
        let stream = call.stream;
        // SAFETY: the area holds at least `bytes` (sized above); the copy in, the kernels and the copy out
        // run in order on the call's stream, which is synchronised before the host buffers are used again.
        unsafe {
            result::memcpy_htod_async(base, &call.host[..bytes], stream)
                .map_err(|e| gpu_err("copying the step to the GPU", e))?;
            if call.profile.is_some() {
                self.launch_timed(&mut call, &launches)?;
            } else if t <= GRAPH_ROWS && call.graphs_wanted {
                let key = (base, t as u64, n_logits as u64);
                if !call.graphs.contains_key(&key) {
                    if call.graphs.len() >= GRAPHS_KEPT {
                        call.drop_graphs();
                    }
                    let exec = self.capture(stream, &launches, self.programmatic.applies(t))?;
                    call.graphs.insert(key, exec);
                }
                result::graph::launch(call.graphs[&key], stream)
                    .map_err(|e| gpu_err("launching the forward pass's graph", e))?;
            } else {
                self.launch(stream, &launches, self.programmatic.applies(t))?;
            }
            let out = std::slice::from_raw_parts_mut(step.logits, n_logits * self.vocab);
            result::memcpy_dtoh_async(out, logits, stream)
                .map_err(|e| gpu_err("copying the logits back", e))?;
            result::stream::synchronize(stream)
                .map_err(|e| gpu_err("running the forward pass", e))?;
        }
        if let Some(p) = &mut call.profile {
            p.add(&launches.iter().map(|l| l.kernel).collect::<Vec<_>>());
        }
        Ok(q3c_abi::OK)
    }
}

/// One kernel launch of a call: its kernel, the device address of its argument block, its work items, and
/// its grid (blocks, threads per block).
struct Launch {
    kernel: usize,
    args: u64,
    items: u64,
    grid: (usize, usize),
}

/// Which calls launch their kernels programmatically: `Q3C_CUDA_PDL` `0` (none), `decode` (calls of one
/// row: a lone sequence's decode step, the default) or `1` (all), to compare. Measured on an H200 (Qwen3-8B
/// shape, alternating rounds): one-row decode after 512 tokens 1.03× as fast; calls of several rows slower
/// (16 rows 0.82×, 512 rows 0.81×), whether captured in a graph or not.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Programmatic {
    Off,
    Decode,
    All,
}

impl Programmatic {
    fn from_env() -> Programmatic {
        match std::env::var("Q3C_CUDA_PDL").as_deref() {
            Ok("0") => Programmatic::Off,
            Ok("1") => Programmatic::All,
            _ => Programmatic::Decode,
        }
    }

    /// Whether a call of `rows` rows launches programmatically.
    fn applies(self, rows: usize) -> bool {
        match self {
            Programmatic::Off => false,
            Programmatic::Decode => rows == 1,
            Programmatic::All => true,
        }
    }
}

/// Launches kernel `f` over `grid` blocks of `block` threads on `stream`, allowed to start while the kernel
/// before it finishes (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`).
///
/// # Safety
/// `f` must take `params`, and wait for the kernel before it (`griddepcontrol.wait`) before reading what
/// that one writes.
unsafe fn launch_programmatic(
    f: sys::CUfunction,
    grid: u32,
    block: u32,
    stream: sys::CUstream,
    params: &mut [*mut c_void],
) -> Result<(), cudarc::driver::DriverError> {
    // SAFETY: a plain C union of integers, all zeros a valid value.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: as the caller promises; the config and its attribute outlive the call.
    unsafe { sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) }.result()
}

/// Calls of at most this many rows (decoding, batched decoding) run as a captured CUDA graph: one launch
/// instead of one per kernel. Longer calls (prompts) launch their kernels one by one.
const GRAPH_ROWS: usize = 16;
/// Graphs kept per model (by area, rows and logit rows); all are dropped when a new one would exceed it.
const GRAPHS_KEPT: usize = 64;

impl Gpu {
    /// Launches `launches` in order on `stream`, programmatically where `programmatic`.
    ///
    /// # Safety
    /// The argument blocks must be in place (or copied ahead on the same stream).
    unsafe fn launch(
        &self,
        stream: sys::CUstream,
        launches: &[Launch],
        programmatic: bool,
    ) -> Result<(), RuntimeError> {
        for l in launches {
            let (mut args, mut items) = (l.args, l.items);
            let mut params = [
                &mut args as *mut u64 as *mut c_void,
                &mut items as *mut u64 as *mut c_void,
            ];
            let (f, grid, block) = (self.kernels[l.kernel], l.grid.0 as u32, l.grid.1 as u32);
            let launched = if programmatic {
                // SAFETY: as below; the kernel waits for the one before at its start (the plan says so).
                unsafe { launch_programmatic(f, grid, block, stream, &mut params) }
            } else {
                // SAFETY: a kernel of the loaded module with its two parameters.
                unsafe {
                    result::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, stream, &mut params)
                }
            };
            launched.map_err(|e| gpu_err("launching a kernel", e))?;
        }
        Ok(())
    }

    /// [`Gpu::launch`] with an event before each launch and after the last, for the profile.
    ///
    /// # Safety
    /// As for [`Gpu::launch`].
    unsafe fn launch_timed(
        &self,
        call: &mut CallMemory,
        launches: &[Launch],
    ) -> Result<(), RuntimeError> {
        let stream = call.stream;
        let events = &call.profile.as_ref().expect("profiling").events;
        for (i, l) in launches.iter().enumerate() {
            // SAFETY: events of this context, on the call's stream.
            unsafe { result::event::record(events[i], stream) }
                .map_err(|e| gpu_err("recording an event", e))?;
            // SAFETY: as for this function.
            unsafe { self.launch(stream, std::slice::from_ref(l), false)? };
        }
        // SAFETY: as above.
        unsafe { result::event::record(events[launches.len()], stream) }
            .map_err(|e| gpu_err("recording an event", e))
    }

    /// `launches` captured into an executable graph (launched programmatically where `programmatic`).
    ///
    /// # Safety
    /// As for [`Gpu::launch`], whenever the graph is launched.
    unsafe fn capture(
        &self,
        stream: sys::CUstream,
        launches: &[Launch],
        programmatic: bool,
    ) -> Result<sys::CUgraphExec, RuntimeError> {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the call's stream; captured launches are recorded, not run.
        unsafe {
            result::stream::begin_capture(stream, mode)
                .map_err(|e| gpu_err("capturing a graph", e))?;
            let launched = self.launch(stream, launches, programmatic);
            let graph =
                result::stream::end_capture(stream).map_err(|e| gpu_err("capturing a graph", e))?;
            launched?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = result::graph::destroy(graph);
            exec.map_err(|e| gpu_err("instantiating a graph", e))
        }
    }
}

impl CallMemory {
    fn drop_graphs(&mut self) {
        for (_, exec) in self.graphs.drain() {
            // SAFETY: instantiated by `Gpu::capture`, destroyed once, not running (calls synchronise).
            let _ = unsafe { result::graph::exec_destroy(exec) };
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if let Ok(call) = self.call.get_mut() {
            let _ = self.ctx.bind();
            call.drop_graphs();
            // SAFETY: created in `open`, destroyed once; every call synchronised it.
            let _ = unsafe { result::stream::destroy(call.stream) };
            if let Some(p) = &call.profile {
                eprint!("{}", p.report(&self.plan.kernels));
                for &e in &p.events {
                    // SAFETY: created in `Profile::new`, destroyed once.
                    let _ = unsafe { result::event::destroy(e) };
                }
            }
        }
        if self.ctx.bind().is_ok() {
            // SAFETY: loaded in `open`, unloaded once; no kernel of it runs after the last call returned.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

/// A host buffer of 64-bit words laid out for a device area at `base`: each `u*s` appends its values
/// (on a word boundary) and returns their device address.
struct Area<'a> {
    bytes: &'a mut Vec<u8>,
    base: u64,
}

impl<'a> Area<'a> {
    fn new(bytes: &'a mut Vec<u8>, base: u64) -> Area<'a> {
        bytes.clear();
        Area { bytes, base }
    }

    /// Words written so far.
    fn words(&self) -> usize {
        self.bytes.len().div_ceil(8)
    }

    fn skip(&mut self, words: usize) {
        self.bytes.resize(self.bytes.len() + 8 * words, 0);
    }

    fn align(&mut self) -> u64 {
        let len = self.bytes.len().next_multiple_of(8);
        self.bytes.resize(len, 0);
        self.base + len as u64
    }

    fn u64s(&mut self, values: &[u64]) -> u64 {
        let at = self.align();
        self.bytes
            .extend(values.iter().flat_map(|v| v.to_ne_bytes()));
        at
    }

    fn u32s(&mut self, values: &[u32]) -> u64 {
        let at = self.align();
        self.bytes
            .extend(values.iter().flat_map(|v| v.to_ne_bytes()));
        at
    }

    fn set_u64s(&mut self, word: usize, values: &[u64]) {
        for (i, v) in values.iter().enumerate() {
            let at = 8 * (word + i);
            self.bytes[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// Bytes written.
    fn finish(self) -> usize {
        self.bytes.len()
    }
}

/// A KV pool's buffers in device memory.
struct DeviceKv {
    ctx: Arc<Context>,
    buffers: Vec<DevBuf>,
    count: usize,
    bytes: usize,
}

impl KvMemory for DeviceKv {
    fn resize(&mut self, bytes: usize) -> bool {
        let mut grown = Vec::with_capacity(self.count);
        for old in self
            .buffers
            .iter()
            .map(Some)
            .chain(std::iter::repeat(None))
            .take(self.count)
        {
            let Ok(new) = DevBuf::new(&self.ctx, bytes) else {
                return false;
            };
            if let Some(old) = old {
                let n = old.bytes.min(bytes);
                // SAFETY: both buffers hold at least n bytes.
                if n > 0 && unsafe { result::memcpy_dtod_sync(new.ptr, old.ptr, n) }.is_err() {
                    return false;
                }
            }
            grown.push(new);
        }
        // Device copies may run behind the host: done before a call's stream reads the buffers.
        if result::ctx::synchronize().is_err() {
            return false;
        }
        self.buffers = grown;
        self.bytes = bytes;
        true
    }

    fn copy_within(&mut self, from: usize, to: usize, n: usize) -> bool {
        if self.ctx.bind().is_err() {
            return false;
        }
        self.buffers.iter().all(|b| {
            // SAFETY: the pool copies within its blocks, inside the buffers.
            unsafe { result::memcpy_dtod_sync(b.ptr + to as u64, b.ptr + from as u64, n) }.is_ok()
        }) && result::ctx::synchronize().is_ok()
    }

    fn pointers(&mut self) -> Vec<*mut f32> {
        self.buffers.iter().map(|b| b.ptr as *mut f32).collect()
    }

    fn resident_bytes(&self) -> usize {
        self.bytes * self.buffers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Area;

    /// A call's area: each array starts on a word, at the device address it is returned with, and words
    /// set later (the step, the argument blocks) land where they were skipped.
    #[test]
    fn the_area_places_arrays_on_words_at_their_device_addresses() {
        let mut host = vec![0xaa; 5];
        let base = 0x1000;
        let mut area = Area::new(&mut host, base);
        area.skip(2);
        assert_eq!(area.words(), 2);
        let odd = area.u32s(&[7, 8, 9]);
        assert_eq!(odd, base + 16);
        let wide = area.u64s(&[u64::MAX]);
        assert_eq!(
            wide,
            base + 32,
            "after three u32s the next array starts on a word"
        );
        area.set_u64s(1, &[42]);
        let bytes = area.finish();
        assert_eq!(bytes, 40);
        let word = |i: usize| u64::from_ne_bytes(host[8 * i..8 * i + 8].try_into().unwrap());
        assert_eq!((word(0), word(1), word(4)), (0, 42, u64::MAX));
        assert_eq!(&host[16..28], [7u32, 8, 9].map(u32::to_ne_bytes).concat());
        assert_eq!(&host[28..32], [0; 4]);
    }

    #[test]
    fn architectures_parse() {
        assert_eq!(super::compute_capability("sm_90"), Some((9, 0)));
        assert_eq!(super::compute_capability("sm_90a"), Some((9, 0)));
        assert_eq!(super::compute_capability("sm_80"), Some((8, 0)));
        assert_eq!(super::compute_capability("gfx90a"), None);
    }
}
