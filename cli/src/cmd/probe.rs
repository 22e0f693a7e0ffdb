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
    /// Under `mpirun -np N` (feature mpi): instead, time an all-reduce of this many f32 among the ranks
    /// (a sharded model runs two per layer of `hidden` floats per token), as rank 0 sees it.
    #[arg(long, value_name = "FLOATS")]
    all_reduce: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(floats) = args.all_reduce {
        if floats == 0 {
            bail!("--all-reduce needs at least 1 float");
        }
        let Some(probe) = crate::ranks::probe_all_reduce(floats)? else {
            return Ok(());
        };
        if args.json {
            return print_json(&probe);
        }
        return print_stdout(&format!(
            "all-reduce of {} f32 over {} ranks: {:.1} µs (median of {}), {:.2} GB/s of payload\n",
            probe.floats,
            probe.ranks,
            probe.median_s * 1e6,
            probe.reps,
            probe.floats as f64 * 4.0 / probe.median_s / 1e9
        ));
    }
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
