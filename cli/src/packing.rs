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
    /// The quantized form of each packed tensor.
    forms: HashMap<String, DType>,
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
        for (name, _, _, read_as) in &plan.weights {
            forms.entry(name.clone()).or_default().push(*read_as);
        }
        let forms = forms
            .into_iter()
            .filter_map(|(name, f)| match f[..] {
                [form @ (DType::Q8 | DType::Q4)] => Some((name, form)),
                _ => None,
            })
            .collect();
        Ok(PlanPacker { forms })
    }

    /// Tensors packed.
    pub fn count(&self) -> usize {
        self.forms.len()
    }
}

/// The `kernel_dtype` and packed byte length of `elements` values in `form`.
fn layout(form: DType, elements: usize) -> (&'static str, usize) {
    match form {
        DType::Q4 => (q3c_abi::Q4_LAYOUT, quant::q4_bytes(elements)),
        _ => (q3c_abi::Q8_LAYOUT, quant::q8_bytes(elements)),
    }
}

impl Packer for PlanPacker {
    fn packing(&self, name: &str, shape: &[usize]) -> Option<(Packed, usize)> {
        let form = *self.forms.get(name)?;
        let (format, len) = layout(form, shape.iter().product());
        let packed = Packed {
            format: format.to_string(),
            layout: q3c_abi::layout_for(format).to_string(),
        };
        Some((packed, len))
    }

    fn pack(&self, name: &str, shape: &[usize], values: &[f32]) -> Vec<u8> {
        let form = self.forms[name];
        let (n, k) = (shape[0], shape[1]);
        let (_, len) = layout(form, values.len());
        let mut out = vec![0u8; len];
        let row = |i: usize, buf: &mut [f32]| buf.copy_from_slice(&values[i * k..(i + 1) * k]);
        match form {
            DType::Q4 => quant::quantize_q4(n, k, row, &mut out),
            _ => quant::quantize_q8(n, k, row, &mut out),
        }
        out
    }
}
