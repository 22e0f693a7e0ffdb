//! `q3c`: the command-line front end. Each subcommand is one file in `cmd/`; the modules beside it are
//! what several subcommands share.

mod bench;
mod chart;
mod cmd;
mod codegen;
mod compare;
mod metrics;
mod model_args;
mod output;
mod packing;
mod probe;
mod prompt_cache;
mod ranks;
mod server;
mod textgen;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let result = cmd::run(cmd::Cli::parse());
    ranks::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
