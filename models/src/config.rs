//! `Qwen3Config`: read from a Hugging Face `config.json` and checked in one place.
//!
//! Both spellings are accepted: the official checkpoints' (transformers 4.x: `rope_theta`, `rope_scaling`,
//! `num_experts`, `torch_dtype`) and transformers 5.x's (`rope_parameters`, `num_local_experts`, `dtype`).
//! [`Qwen3Config::from_json`] is the only place unsupported settings are rejected; every error names the
//! field at fault.

use std::path::Path;

use serde_json::{Map, Value};

use crate::dtype::DType;

/// A config that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed config JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config field `{field}`: {message}")]
    Field { field: String, message: String },
}

fn field_err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        message: message.into(),
    }
}

/// YaRN context extension, with transformers' defaults resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// Multiplier on cos/sin: explicit, or from `mscale`/`mscale_all_dim`, or 0.1·ln(factor) + 1.
    pub attention_factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
}

/// Mixture-of-experts settings (Qwen3-30B-A3B, Qwen3-235B-A22B).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

/// A checked Qwen3 configuration. Field names follow `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP (unused by MoE layers).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<YarnScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint's weights are stored in.
    pub torch_dtype: DType,
    pub bos_token_id: Option<u32>,
    /// Token ids that end generation (`eos_token_id`, an id or a list).
    pub eos_token_ids: Vec<u32>,
    pub moe: Option<MoeConfig>,
}

impl Qwen3Config {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Qwen3Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Qwen3Config::from_json(&text)
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Qwen3Config, ConfigError> {
        let value: Value = serde_json::from_str(text)?;
        let obj = value
            .as_object()
            .ok_or_else(|| field_err("(root)", "must be a JSON object"))?;
        parse(obj)
    }

    /// Whether layer `layer` uses the sparse MoE block (per transformers' rule) rather than the dense MLP.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| {
            !m.mlp_only_layers.contains(&layer)
                && m.num_experts > 0
                && (layer + 1).is_multiple_of(m.decoder_sparse_step)
        })
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The config as `config.json` in the official checkpoints' spelling; reads back to an equal config.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "model_type": if self.moe.is_some() { "qwen3_moe" } else { "qwen3" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.as_ref().map(|y| serde_json::json!({
                "rope_type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "attention_factor": y.attention_factor,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "truncate": y.truncate,
            })),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype.torch_name(),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "hidden_act": "silu",
            "attention_bias": false,
            "use_sliding_window": false,
        });
        if let Some(m) = &self.moe {
            let obj = v.as_object_mut().expect("object");
            obj.insert("num_experts".into(), m.num_experts.into());
            obj.insert("num_experts_per_tok".into(), m.num_experts_per_tok.into());
            obj.insert(
                "moe_intermediate_size".into(),
                m.moe_intermediate_size.into(),
            );
            obj.insert("norm_topk_prob".into(), m.norm_topk_prob.into());
            obj.insert("decoder_sparse_step".into(), m.decoder_sparse_step.into());
            obj.insert("mlp_only_layers".into(), m.mlp_only_layers.clone().into());
        }
        v
    }

    /// Total parameter count (embedding counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        crate::tensors::expected_tensors(self)
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.get(key).map(|v| as_usize(v, key)).transpose()
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        let n = self
            .usize_opt(key)?
            .ok_or_else(|| field_err(key, "is missing"))?;
        if n == 0 {
            return Err(field_err(key, "must be positive, is 0"));
        }
        Ok(n)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| field_err(key, format!("must be a number, is {v}")))
            })
            .transpose()
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| field_err(key, format!("must be true or false, is {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| field_err(key, format!("must be a string, is {v}")))
            })
            .transpose()
    }
}

fn as_usize(v: &Value, key: &str) -> Result<usize, ConfigError> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| field_err(key, format!("must be a non-negative integer, is {v}")))
}

fn parse(obj: &Map<String, Value>) -> Result<Qwen3Config, ConfigError> {
    let f = Fields(obj);

    let model_type = f.str_opt("model_type")?;
    if let Some(t) = model_type {
        if t != "qwen3" && t != "qwen3_moe" {
            return Err(field_err(
                "model_type",
                format!("\"{t}\" is not a Qwen3 model (expected \"qwen3\" or \"qwen3_moe\")"),
            ));
        }
    }
    if let Some(act) = f.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(field_err(
                "hidden_act",
                format!("\"{act}\" is not supported (Qwen3 uses \"silu\")"),
            ));
        }
    }
    if f.bool_or("attention_bias", false)? {
        return Err(field_err(
            "attention_bias",
            "true is not supported (Qwen3 projections have no bias)",
        ));
    }
    if f.bool_or("use_sliding_window", false)? {
        return Err(field_err(
            "use_sliding_window",
            "true is not supported (only full attention)",
        ));
    }
    if let Some(types) = f.get("layer_types") {
        let list = types
            .as_array()
            .ok_or_else(|| field_err("layer_types", "must be a list"))?;
        if let Some(bad) = list.iter().find(|t| t.as_str() != Some("full_attention")) {
            return Err(field_err(
                "layer_types",
                format!("{bad} is not supported (only \"full_attention\")"),
            ));
        }
    }

    let vocab_size = f.positive("vocab_size")?;
    let hidden_size = f.positive("hidden_size")?;
    let num_hidden_layers = f.positive("num_hidden_layers")?;
    let num_attention_heads = f.positive("num_attention_heads")?;
    let num_key_value_heads = match f.usize_opt("num_key_value_heads")? {
        None => num_attention_heads,
        Some(0) => return Err(field_err("num_key_value_heads", "must be positive, is 0")),
        Some(n) => n,
    };
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(field_err(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"
            ),
        ));
    }
    // transformers' defaults when head_dim is absent: 128 for qwen3, hidden / heads for qwen3_moe.
    let head_dim = match f.usize_opt("head_dim")? {
        Some(d) => d,
        None if model_type == Some("qwen3_moe") => hidden_size / num_attention_heads,
        None => 128,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(field_err(
            "head_dim",
            format!("must be a positive even number for RoPE, is {head_dim}"),
        ));
    }
    let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
    if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
        return Err(field_err(
            "rms_norm_eps",
            format!("must be a finite non-negative number, is {rms_norm_eps}"),
        ));
    }
    let max_position_embeddings = f.usize_opt("max_position_embeddings")?.unwrap_or(32768);
    if max_position_embeddings == 0 {
        return Err(field_err(
            "max_position_embeddings",
            "must be positive, is 0",
        ));
    }

    let (rope_theta, rope_scaling) = parse_rope(&f, max_position_embeddings)?;

    let dtype_field = if f.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    let torch_dtype = match f.str_opt(dtype_field)? {
        None => DType::F32,
        Some(s) => DType::from_torch_name(s).ok_or_else(|| {
            field_err(
                dtype_field,
                format!("\"{s}\" is not supported (float32, bfloat16 or float16)"),
            )
        })?,
    };

    let experts_field = if f.get("num_local_experts").is_some() {
        "num_local_experts"
    } else {
        "num_experts"
    };
    let num_experts = f.usize_opt(experts_field)?.unwrap_or(0);
    let moe = if num_experts > 0 {
        let top_k = f.positive("num_experts_per_tok")?;
        if top_k > num_experts {
            return Err(field_err(
                "num_experts_per_tok",
                format!("{top_k} exceeds the {num_experts} experts"),
            ));
        }
        let mlp_only_layers = match f.get("mlp_only_layers") {
            None => vec![],
            Some(v) => v
                .as_array()
                .ok_or_else(|| field_err("mlp_only_layers", "must be a list of layer indices"))?
                .iter()
                .map(|x| as_usize(x, "mlp_only_layers"))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if let Some(bad) = mlp_only_layers.iter().find(|&&l| l >= num_hidden_layers) {
            return Err(field_err(
                "mlp_only_layers",
                format!("layer {bad} does not exist (num_hidden_layers = {num_hidden_layers})"),
            ));
        }
        Some(MoeConfig {
            num_experts,
            num_experts_per_tok: top_k,
            moe_intermediate_size: f.positive("moe_intermediate_size")?,
            norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
            decoder_sparse_step: match f.usize_opt("decoder_sparse_step")? {
                None => 1,
                Some(0) => return Err(field_err("decoder_sparse_step", "must be positive, is 0")),
                Some(n) => n,
            },
            mlp_only_layers,
        })
    } else {
        None
    };

    let config = Qwen3Config {
        vocab_size,
        hidden_size,
        intermediate_size: f.usize_opt("intermediate_size")?.unwrap_or(0),
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        torch_dtype,
        bos_token_id: f.usize_opt("bos_token_id")?.map(|n| n as u32),
        eos_token_ids: parse_eos(&f)?,
        moe,
    };
    if (0..num_hidden_layers).any(|l| !config.is_sparse_layer(l)) && config.intermediate_size == 0 {
        return Err(field_err(
            "intermediate_size",
            "is missing or 0, but some layers use the dense MLP",
        ));
    }
    if let Some(&bad) = config
        .eos_token_ids
        .iter()
        .find(|&&id| id as usize >= vocab_size)
    {
        return Err(field_err(
            "eos_token_id",
            format!("{bad} is outside the vocabulary of {vocab_size}"),
        ));
    }
    Ok(config)
}

fn parse_eos(f: &Fields) -> Result<Vec<u32>, ConfigError> {
    match f.get("eos_token_id") {
        None => Ok(vec![]),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|v| as_usize(v, "eos_token_id").map(|n| n as u32))
            .collect(),
        Some(v) => Ok(vec![as_usize(v, "eos_token_id")? as u32]),
    }
}

/// Reads θ and any YaRN scaling from either spelling: `rope_theta` + `rope_scaling` (4.x) or
/// `rope_parameters` (5.x).
fn parse_rope(
    f: &Fields,
    max_position_embeddings: usize,
) -> Result<(f64, Option<YarnScaling>), ConfigError> {
    let (params, prefix) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, Some(s)) => (Some(s), "rope_scaling"),
        (None, None) => (None, ""),
    };
    let params = params
        .map(|p| {
            p.as_object()
                .ok_or_else(|| field_err(prefix, "must be an object or null"))
        })
        .transpose()?;
    let p = params.map(Fields);
    let name = |key: &str| format!("{prefix}.{key}");

    let theta = match p
        .as_ref()
        .map(|p| p.f64_opt("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => f
            .f64_opt("rope_theta")?
            .ok_or_else(|| field_err("rope_theta", "is missing"))?,
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(field_err(
            "rope_theta",
            format!("must be a finite number above 1, is {theta}"),
        ));
    }
    let Some(p) = p else { return Ok((theta, None)) };

    let type_key = if p.get("rope_type").is_some() {
        "rope_type"
    } else {
        "type"
    };
    let rope_type = p
        .str_opt(type_key)
        .map_err(|_| field_err(&name(type_key), "must be a string"))?
        .unwrap_or("default");
    match rope_type {
        "default" => Ok((theta, None)),
        "yarn" => {
            let num = |key: &str| {
                p.f64_opt(key)
                    .map_err(|_| field_err(&name(key), "must be a number"))
            };
            let original = match p.get("original_max_position_embeddings") {
                None => max_position_embeddings,
                Some(v) => as_usize(v, &name("original_max_position_embeddings"))?,
            };
            if original == 0 {
                return Err(field_err(
                    &name("original_max_position_embeddings"),
                    "must be positive, is 0",
                ));
            }
            let factor = num("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
            if !(factor.is_finite() && factor > 0.0) {
                return Err(field_err(
                    &name("factor"),
                    format!("must be a positive number, is {factor}"),
                ));
            }
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (
                num("attention_factor")?,
                num("mscale")?,
                num("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            // transformers treats a missing or zero beta as its default.
            let beta_fast = num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
            let beta_slow = num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
            let truncate = p
                .bool_or("truncate", true)
                .map_err(|_| field_err(&name("truncate"), "must be true or false"))?;
            let yarn = YarnScaling {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            };
            Ok((theta, Some(yarn)))
        }
        other => Err(field_err(
            &name(type_key),
            format!("\"{other}\" is not supported (\"default\" or \"yarn\")"),
        )),
    }
}
