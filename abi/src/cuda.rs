//! The CUDA artifact: a file holding the PTX of every kernel and the manifest with its launch plan.
//!
//! ```text
//! offset 0   8 bytes   magic "Q3CCUDA\0"
//!        8   u32 LE    ABI version (crate::ABI_VERSION)
//!       12   u32 LE    0 (reserved)
//!       16   u64 LE    manifest length m
//!       24   m bytes   the manifest (JSON, with `launch` and `target_cpu` = the GPU architecture, e.g. sm_90)
//!   24 + m   rest      the PTX module (text), ending in one NUL byte, as the driver's loader takes it
//! ```
//!
//! Each kernel the launch plan names is a PTX `.entry kernel(const uint64_t *args, uint64_t items)` that
//! runs work item `blockIdx.x · blockDim.x + threadIdx.x` if it is below `items`; a runtime launches
//! the grid `Dispatch::grid` gives each dispatch (a block per item for cooperative kernels), the argument block
//! `[T, step, arguments...]` (`crate::launch`) and the `q3c_step` it points to in device memory.

/// The manifest's `backend` in a CUDA artifact (`target_cpu` is then the GPU architecture, e.g. `sm_90`).
pub const BACKEND: &str = "llvm-nvptx";

/// The first bytes of a CUDA artifact.
pub const MAGIC: &[u8; 8] = b"Q3CCUDA\0";

const HEADER_BYTES: usize = 24;

/// The bytes of a CUDA artifact holding `manifest` (JSON) and `ptx`.
pub fn encode(manifest: &[u8], ptx: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + manifest.len() + ptx.len() + 1);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&crate::ABI_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    out.extend_from_slice(manifest);
    out.extend_from_slice(ptx.as_bytes());
    out.push(0);
    out
}

/// Whether `bytes` begin as a CUDA artifact does.
pub fn is_cuda_artifact(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// The parts of a CUDA artifact.
pub struct CudaArtifact<'a> {
    pub abi_version: u32,
    pub manifest: &'a [u8],
    /// The PTX text with its terminating NUL.
    pub ptx: &'a [u8],
}

/// Splits a CUDA artifact into its parts, or says why it is not one.
pub fn decode(bytes: &[u8]) -> Result<CudaArtifact<'_>, String> {
    if !is_cuda_artifact(bytes) {
        return Err("not a q3c CUDA artifact (no Q3CCUDA magic)".into());
    }
    if bytes.len() < HEADER_BYTES {
        return Err("truncated CUDA artifact (no complete header)".into());
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let abi_version = word(8);
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let rest = &bytes[HEADER_BYTES..];
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= rest.len())
        .ok_or("truncated CUDA artifact (the manifest runs past the end)")?;
    let (manifest, ptx) = rest.split_at(len);
    if ptx.last() != Some(&0) || !ptx.contains(&b'.') {
        return Err("truncated CUDA artifact (the PTX does not end in NUL)".into());
    }
    Ok(CudaArtifact {
        abi_version,
        manifest,
        ptx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_truncation() {
        let bytes = encode(b"{\"a\":1}", ".version 8.0\n");
        let a = decode(&bytes).unwrap();
        assert_eq!(a.abi_version, crate::ABI_VERSION);
        assert_eq!(a.manifest, b"{\"a\":1}");
        assert_eq!(a.ptx, b".version 8.0\n\0");
        for cut in [3, 20, 28, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "{cut}");
        }
        assert!(decode(b"\x7fELF....").is_err());
    }
}
