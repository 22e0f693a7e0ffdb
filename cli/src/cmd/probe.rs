//! `q3c probe`: this machine's roofs (`crate::probe`), which benchmark figures are compared with.

use anyhow::{bail, Result};

use crate::output::{default_threads, print_json, print_stdout};

#[derive(clap::Args)]
pub struct Args {
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Size of the bandwidth probe's buffer in MiB (well above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.mib == 0 {
        bail!("--mib must be at least 1");
    }
    let limits = crate::probe::run(args.threads.unwrap_or_else(default_threads), args.mib);
    if args.json {
        return print_json(&limits);
    }
    print_stdout(&format!(
        "read bandwidth: {:.1} GB/s\nf32 FMA peak:   {:.1} GFLOP/s ({})\n({} threads)\n",
        limits.read_gb_s, limits.fma_gflop_s, limits.isa, limits.threads
    ))
}
