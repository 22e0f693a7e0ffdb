//! What q3c's code generators share: the memory plan of a graph ([`plan`]), the dispatches of a forward
//! call ([`launch`]), the manifest built from them ([`manifest`]), and linking an object file into the artifact `.so` ([`link_shared`]).

pub mod items;
pub mod launch;
pub mod manifest;
pub mod plan;

use std::path::Path;

/// Why a graph could not be compiled or linked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("target: {0}")]
    Target(String),
    #[error("code generation failed (a q3c bug): {0}")]
    Internal(String),
    #[error("linking failed: {0}")]
    Link(String),
}

/// Links an object file into a shared library at `out` with the system C compiler (`$CC`, default `cc`).
/// The library is written beside `out` and renamed into place, so a failed link leaves nothing behind.
pub fn link_shared(object: &[u8], out: &Path) -> Result<(), BackendError> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stem = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.so".into());
    let pid = std::process::id();
    let obj_path = dir.join(format!(".{stem}.{pid}.o"));
    let tmp_so = dir.join(format!(".{stem}.{pid}.tmp"));
    let cleanup = || {
        let _ = std::fs::remove_file(&obj_path);
        let _ = std::fs::remove_file(&tmp_so);
    };
    std::fs::write(&obj_path, object)
        .map_err(|e| BackendError::Link(format!("cannot write {}: {e}", obj_path.display())))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let result = std::process::Command::new(&cc)
        .args([
            "-shared",
            "-nostartfiles",
            "-Wl,-z,defs",
            "-Wl,--gc-sections",
            "-o",
        ])
        .arg(&tmp_so)
        .arg(&obj_path)
        .arg("-lm")
        .output();
    let outcome = match result {
        Err(e) => Err(BackendError::Link(format!(
            "cannot run {cc}: {e} (a C compiler is needed to link the .so)"
        ))),
        Ok(o) if !o.status.success() => Err(BackendError::Link(format!(
            "{cc} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Ok(_) => std::fs::rename(&tmp_so, out)
            .map_err(|e| BackendError::Link(format!("cannot write {}: {e}", out.display()))),
    };
    cleanup();
    outcome
}
