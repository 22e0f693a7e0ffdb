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
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    // The other ranks of a sharded job end with this one: MPI finalised after success, the job aborted
    // after a failure (they may be waiting for this rank).
    ranks::finish(result.is_ok());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
