//! `q3c`: the command-line front end.

mod bench;
mod chart;
mod codegen;
mod commands;
mod compare;
mod probe;
mod serve;
mod textgen;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
