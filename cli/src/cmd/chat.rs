//! `q3c chat`: a conversation in the terminal.

use anyhow::Result;

use crate::model_args::ChatModelArgs;
use crate::textgen::{self, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: ChatModelArgs,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens inside each thinking block.
    #[arg(long, value_name = "N")]
    thinking_budget: Option<usize>,
    /// Do not print the thinking.
    #[arg(long)]
    hide_thinking: bool,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 2048)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(args: Args) -> Result<()> {
    let (text, model) = args.target.load()?;
    let mut session = model.session();
    textgen::repl(
        &mut *session,
        &text,
        &args.sampling,
        args.max_new_tokens,
        args.thinking_budget,
        args.hide_thinking,
        args.system,
    )
}
