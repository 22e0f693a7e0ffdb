//! The LLVM backend: the same graph, plan, manifest and ABI as the Cranelift backend, compiled through
//! LLVM's O3 pipeline for the target CPU (512-bit vectors and AVX512_BF16 where present), or to PTX.
//!
//! Everything here sits behind the `llvm` cargo feature (LLVM 19 through inkwell); without it the crate is
//! empty and the rest of q3c builds without LLVM installed.
//!
//! - [`compile`]: a relocatable object with the kernels, `q3c_forward` and the manifest, linked into a
//!   `.so` by [`q3c_backend_common::link_shared`].
//! - [`compile_ptx`]: every kernel of the graph as a PTX entry point (one GPU thread per work item).
//! - [`compile_gpu_emulation`]: the same entry points compiled for this CPU, launched by the runtime.

#[cfg(feature = "llvm")]
mod builder;
#[cfg(feature = "llvm")]
mod fb;
#[cfg(feature = "llvm")]
mod forward;
#[cfg(feature = "llvm")]
mod gemm;
#[cfg(feature = "llvm")]
mod gpu;
#[cfg(feature = "llvm")]
mod gpu_gemm;
#[cfg(feature = "llvm")]
mod gpu_mma;
#[cfg(feature = "llvm")]
mod gpu_parts;
#[cfg(feature = "llvm")]
mod gpu_quant;
#[cfg(feature = "llvm")]
mod module;
#[cfg(feature = "llvm")]
mod q8;
#[cfg(feature = "llvm")]
mod staging;
#[cfg(feature = "llvm")]
mod target;

#[cfg(feature = "llvm")]
pub use gpu::{compile_gpu_emulation, compile_ptx, PtxModule, PtxOptions};
#[cfg(feature = "llvm")]
pub use module::{compile, CompileOptions, Compiled};
#[cfg(feature = "llvm")]
pub use target::{bf16_dot_available, bf16_tensor_cores, host_cpu};
