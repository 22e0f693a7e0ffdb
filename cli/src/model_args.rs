//! The model flags the running subcommands share, and loading what they name into a [`Model`]: a model
//! directory runs on the reference executor (or, with `--jit`, compiled in process), a `.so` is loaded with
//! its `--weights`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use q3c_models::{Checkpoint, ModelSource};
use q3c_runtime::text::TextModel;
use q3c_runtime::{CompiledModel, Model, ReferenceModel, Residency};

use crate::output::default_threads;
use crate::textgen;

/// Which model to run: a model directory (reference executor), or a compiled artifact plus weights.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A model directory (config.json + safetensors; runs the reference executor) or a compiled `.so`.
    #[arg(long)]
    pub model: PathBuf,
    /// The weights directory, when --model is a compiled `.so`.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Threads for a compiled model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compile --model (a model directory) in process with cranelift-jit and run that code.
    #[arg(long)]
    pub jit: bool,
    /// Read a compiled model's weights in place from the memory-mapped checkpoint instead of copying them
    /// into huge-page memory: quicker load and no second copy, slower decode.
    #[arg(long)]
    pub mmap_weights: bool,
}

/// The model a chat surface (`chat`, `serve`) runs: positional, with its tokenizer.
#[derive(clap::Args)]
pub struct ChatModelArgs {
    /// A compiled `.so` (with --weights) or a model directory.
    pub model: PathBuf,
    /// The weights directory (with tokenizer.json and tokenizer_config.json), for a `.so`.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Threads for a compiled model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory with the tokenizer files (default: the model or weights directory).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Read a compiled model's weights in place from the memory-mapped checkpoint instead of copying them
    /// into huge-page memory: quicker load and no second copy, slower decode.
    #[arg(long)]
    pub mmap_weights: bool,
}

impl ChatModelArgs {
    /// Loads the tokenizer and chat template, then the model.
    pub fn load(self) -> Result<(TextModel, Model)> {
        let dir = textgen::tokenizer_dir(
            self.tokenizer.as_deref(),
            &self.model,
            self.weights.as_deref(),
        )?;
        let text = TextModel::load(&dir)?;
        let args = ModelArgs {
            model: self.model,
            weights: self.weights,
            threads: self.threads,
            jit: false,
            mmap_weights: self.mmap_weights,
        };
        Ok((text, args.load()?))
    }
}

impl ModelArgs {
    fn residency(&self) -> Residency {
        if self.mmap_weights {
            Residency::Mapped
        } else {
            Residency::Copied
        }
    }

    /// Threads for a compiled model: as given, else every core.
    fn threads(&self) -> Result<usize> {
        Ok(self.threads_given()?.unwrap_or_else(default_threads))
    }

    /// `--threads`, if given (at least 1).
    fn threads_given(&self) -> Result<Option<usize>> {
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        Ok(self.threads)
    }

    /// Loads the model the flags name.
    pub fn load(&self) -> Result<Model> {
        if self.jit {
            return self.load_jit();
        }
        if self.model.is_dir() {
            if self.weights.is_some() {
                bail!(
                    "--weights is only for a compiled --model .so; {} is a model directory",
                    self.model.display()
                );
            }
            if self.mmap_weights {
                bail!(
                    "--mmap-weights is only for a compiled --model .so (or --jit); {} runs on the reference executor",
                    self.model.display()
                );
            }
            return load_reference(&self.model);
        }
        if !self.model.is_file() {
            bail!(
                "--model {}: no such file or directory",
                self.model.display()
            );
        }
        let weights = self.weights.as_ref().with_context(|| {
            format!(
                "--model {} is a compiled artifact: give its weights with --weights DIR",
                self.model.display()
            )
        })?;
        let ranks = q3c_runtime::compiled::read_manifest(&self.model)?.ranks;
        let model = if ranks > 1 {
            if self.mmap_weights {
                bail!(
                    "--mmap-weights: the ranks of a sharded model copy their slices of the weights"
                );
            }
            crate::ranks::load(&self.model, weights, self.threads_given()?, ranks)?
        } else {
            CompiledModel::load_with(&self.model, weights, self.threads()?, self.residency())?
        };
        Ok(Model::Compiled(Box::new(model)))
    }

    /// Compiles the model directory in process and binds its weights (or those of --weights).
    fn load_jit(&self) -> Result<Model> {
        if !self.model.is_dir() {
            bail!(
                "--jit needs --model to be a model directory (config.json + weights), not {}",
                self.model.display()
            );
        }
        let cfg = ModelSource::Directory(self.model.clone()).config()?;
        let graph = q3c_compiler::lower(&cfg).context("lowering failed (a q3c bug)")?;
        let opts = q3c_backend_cranelift::CompileOptions::default();
        let jit = q3c_backend_cranelift::compile_jit(&graph, &cfg, q3c_compiler::LOGITS, &opts)?;
        let weights = self.weights.as_deref().unwrap_or(&self.model);
        let threads = self.threads()?;
        // SAFETY: `forward` and `manifest` come from the same JIT compilation, kept alive by `code`.
        let model = unsafe {
            CompiledModel::from_code(
                jit.forward,
                jit.manifest,
                Box::new(jit.code),
                weights,
                threads,
                self.residency(),
            )?
        };
        Ok(Model::Compiled(Box::new(model)))
    }
}

/// The reference executor over the model directory `dir`.
fn load_reference(dir: &Path) -> Result<Model> {
    let cfg = ModelSource::Directory(dir.to_path_buf()).config()?;
    let ckpt = Checkpoint::open(dir)?;
    ckpt.check(&cfg)
        .with_context(|| format!("weights in {}", dir.display()))?;
    let graph = q3c_compiler::lower(&cfg).context("lowering failed (a q3c bug)")?;
    let model = ReferenceModel::new(graph, &ckpt, q3c_compiler::LOGITS)?;
    Ok(Model::Reference {
        model: Box::new(model),
        eos_token_ids: cfg.eos_token_ids,
    })
}
