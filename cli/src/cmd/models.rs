//! `q3c models`: the released models q3c knows by name.

use anyhow::Result;
use q3c_models::registry;

use crate::output::print_stdout;

pub fn run() -> Result<()> {
    let mut text = String::new();
    for name in registry::names() {
        let cfg = registry::lookup(name).expect("registry name");
        let kind = match &cfg.moe {
            Some(m) => format!(
                "MoE {} experts, top-{}",
                m.num_experts, m.num_experts_per_tok
            ),
            None => "dense".into(),
        };
        text += &format!(
            "{name:<16} {:>7.2}B params  {:>2} layers  {:>2}/{} heads  {kind}{}\n",
            cfg.parameter_count() as f64 / 1e9,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            if cfg.tie_word_embeddings {
                ", tied"
            } else {
                ""
            },
        );
    }
    print_stdout(&text)
}
