//! Pre-quantized checkpoints: which tensors they pack, and how — exactly the weights an artifact compiled
//! with `--quantize FORMAT` reads in a quantized form, as the memory planner decides, so a checkpoint and an
//! artifact of the same format always agree on every tensor.

use std::collections::HashMap;

use anyhow::Result;
use q3c_compiler::Strategy;
use q3c_ir::DType;
use q3c_models::writer::Packer;
use q3c_models::{Packed, Qwen3Config};
use q3c_runtime::compiled::quant;

use crate::codegen::{self, Quantize};

/// The [`Packer`] of one format for one model.
pub struct PlanPacker {
    /// The packed format (`q3c_abi::Q8_LAYOUT` or `Q4_LAYOUT`) of each packed tensor.
    formats: HashMap<String, &'static str>,
}

impl PlanPacker {
    /// The tensors of `cfg` that `--quantize format` reads quantized (a tensor also read as stored — a
    /// tied embedding, whose logits use a quantized copy — stays plain).
    pub fn new(cfg: &Qwen3Config, format: Quantize) -> Result<PlanPacker> {
        // Which weights are quantized does not depend on the fusion strategy.
        let graph = codegen::fused_graph(cfg, &Strategy::parse("all")?)?;
        let plan =
            q3c_backend_common::plan::plan_with(&graph, q3c_compiler::LOGITS, 1, format.dtype())?;
        let mut forms: HashMap<String, Vec<DType>> = HashMap::new();
        for w in &plan.weights {
            forms.entry(w.name.clone()).or_default().push(w.read_as);
        }
        // A weight's `kernel_dtype` is its read form's name (`q8`, `q4`, `q6`).
        let formats = forms
            .into_iter()
            .filter_map(|(name, f)| match f[..] {
                [form] if form.is_quantized() => Some((name, form.name())),
                _ => None,
            })
            .collect();
        Ok(PlanPacker { formats })
    }

    /// Tensors packed.
    pub fn count(&self) -> usize {
        self.formats.len()
    }
}

impl Packer for PlanPacker {
    fn packing(&self, name: &str, shape: &[usize]) -> Option<(Packed, usize)> {
        let format = *self.formats.get(name)?;
        let len = quant::packed_bytes(format, shape.iter().product())?;
        let packed = Packed {
            format: format.to_string(),
            layout: q3c_abi::layout_for(format).to_string(),
        };
        Some((packed, len))
    }

    fn pack(&self, name: &str, shape: &[usize], values: &[f32]) -> Vec<u8> {
        let format = self.formats[name];
        let (n, k) = (shape[0], shape[1]);
        let len = quant::packed_bytes(format, values.len()).expect("q8 or q4");
        let mut out = vec![0u8; len];
        let row = |i: usize, buf: &mut [f32]| buf.copy_from_slice(&values[i * k..(i + 1) * k]);
        quant::quantize(format, n, k, row, &mut out);
        out
    }
}
