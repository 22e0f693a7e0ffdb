//! Resolves what a user names as MODEL: a registry name, a `config.json`, or a model directory.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, Qwen3Config};
use crate::registry;

/// Where a model's config came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A released model by name.
    Registry(String),
    /// A `config.json` file.
    ConfigFile(PathBuf),
    /// A directory holding `config.json` (and usually the weights).
    Directory(PathBuf),
}

/// MODEL could not be resolved or its config is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("unknown model '{name}': not a path, and not one of {}", registry::names().join(", "))]
    Unknown { name: String },
    #[error("{dir} has no config.json")]
    NoConfig { dir: PathBuf },
    #[error("{path}: {source}")]
    Config { path: String, source: ConfigError },
}

impl ModelSource {
    /// Classifies `spec`: an existing directory or file wins over a registry name.
    pub fn parse(spec: &str) -> ModelSource {
        let path = Path::new(spec);
        if path.is_dir() {
            ModelSource::Directory(path.to_path_buf())
        } else if path.is_file() {
            ModelSource::ConfigFile(path.to_path_buf())
        } else {
            ModelSource::Registry(spec.to_string())
        }
    }

    /// Loads and checks the config.
    pub fn config(&self) -> Result<Qwen3Config, SourceError> {
        let from_file = |path: &Path| {
            Qwen3Config::from_file(path).map_err(|source| SourceError::Config {
                path: path.display().to_string(),
                source,
            })
        };
        match self {
            ModelSource::Registry(name) => {
                registry::lookup(name).ok_or_else(|| SourceError::Unknown { name: name.clone() })
            }
            ModelSource::ConfigFile(path) => from_file(path),
            ModelSource::Directory(dir) => {
                let path = dir.join("config.json");
                if !path.is_file() {
                    return Err(SourceError::NoConfig { dir: dir.clone() });
                }
                from_file(&path)
            }
        }
    }

    /// A short name for the model (registry name, or the directory / file stem).
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Registry(name) => name.clone(),
            ModelSource::ConfigFile(p) | ModelSource::Directory(p) => p.display().to_string(),
        }
    }
}

/// Shorthand: resolve `spec` and load its config.
pub fn resolve(spec: &str) -> Result<Qwen3Config, SourceError> {
    ModelSource::parse(spec).config()
}
