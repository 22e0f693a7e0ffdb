//! The Cranelift backend: compiles a verified graph ahead of time into a native shared library.
//!
//! Each graph node becomes one kernel specialised to its constant dims (hidden symbols); `q3c_forward`
//! dispatches them in order through the runtime's `parallel_for`. The object is written with
//! `cranelift-object` (PIC) and linked with the system C compiler into a `.so` that imports only libc/libm.
//! The contract with the runtime is `q3c_abi` (ABI version, manifest, step struct).

mod emit;
mod gemm;
mod module;

pub use module::{compile, compile_jit, CompileOptions, Compiled, JitCode, JitCompiled};

pub use q3c_backend_common::{link_shared, BackendError};
