//! Runtime errors.

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid graph: {0}")]
    Graph(#[from] q3c_ir::VerifierErrors),
    #[error("weight {name}: {message}")]
    Weight { name: String, message: String },
    #[error("{0}")]
    Input(String),
    #[error("{path}: {message}")]
    Artifact { path: String, message: String },
    #[error(transparent)]
    Checkpoint(#[from] q3c_models::CheckpointError),
    /// The GPU or its driver failed or refused (no driver, out of device memory, a failed launch).
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("internal error (a q3c bug): {0}")]
    Internal(String),
}
