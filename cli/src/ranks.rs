//! Sharded models under `mpirun`: loading one rank of an artifact compiled with `--shards N` (rank 0
//! returns the model to the subcommand; every other rank follows it and exits), and the MPI transport
//! their collectives run over (feature `mpi`).
//!
//! Every rank runs the same command line. Rank 0 does what the subcommand does — tokenizer, sampling, the
//! HTTP server, the scheduler — and the runtime mirrors each forward call to the others
//! (`q3c_runtime::Transport`). A collective that does not complete within `Q3C_MPI_TIMEOUT` seconds
//! (default 300) means a rank died or hangs: the rank that waited says so and aborts the job.

use std::path::Path;

use anyhow::Result;
use q3c_runtime::CompiledModel;

/// Loads rank `r` of `artifact`, sharded over `ranks` ranks; on a rank other than 0, follows rank 0 until
/// it is done and ends the process.
pub fn load(
    artifact: &Path,
    weights: &Path,
    threads: Option<usize>,
    ranks: usize,
) -> Result<CompiledModel> {
    imp::load(artifact, weights, threads, ranks)
}

/// Ends MPI, where this process started it (after the model is dropped: rank 0's drop stops the others).
pub fn finish() {
    #[cfg(feature = "mpi")]
    imp::finish();
}

#[cfg(not(feature = "mpi"))]
mod imp {
    use super::*;

    pub fn load(
        artifact: &Path,
        _: &Path,
        _: Option<usize>,
        ranks: usize,
    ) -> Result<CompiledModel> {
        anyhow::bail!(
            "{} is sharded over {ranks} ranks: it runs as `mpirun -np {ranks} q3c ...` with a q3c built with the `mpi` feature (./x build)",
            artifact.display()
        )
    }
}

#[cfg(feature = "mpi")]
mod imp {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use q3c_runtime::Transport;

    use super::*;

    /// MPI, once started (dropping it finalises MPI).
    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

    /// Ranks `mpirun` (Open MPI, or MPICH's Hydra) started, read before MPI is: `None` outside a launcher.
    fn launched_ranks() -> Option<(usize, usize)> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok()?.parse::<usize>().ok())
        };
        let size = var(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])?;
        let local = var(&["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]).unwrap_or(size);
        Some((size, local))
    }

    pub fn load(
        artifact: &Path,
        weights: &Path,
        threads: Option<usize>,
        ranks: usize,
    ) -> Result<CompiledModel> {
        let Some((size, local)) = launched_ranks() else {
            bail!(
                "{} is sharded over {ranks} ranks: run it as `mpirun -np {ranks} q3c ...`",
                artifact.display()
            );
        };
        if size != ranks {
            bail!(
                "{} is sharded over {ranks} ranks, and mpirun started {size}: run it with mpirun -np {ranks}",
                artifact.display()
            );
        }
        let transport = Arc::new(MpiTransport::start()?);
        let rank = transport.rank();
        // The ranks on this host share its cores.
        let threads =
            threads.unwrap_or_else(|| (crate::output::default_threads() / local.max(1)).max(1));
        let model = match CompiledModel::load_rank(artifact, weights, threads, transport.clone()) {
            Ok(model) => model,
            // Ending this process ends the job (mpirun stops the other ranks).
            Err(e) => bail!("rank {rank}: {e}"),
        };
        if rank == 0 {
            return Ok(model);
        }
        if let Err(e) = model.follow() {
            eprintln!("error: rank {rank}: {e}");
            transport.abort();
        }
        drop(model);
        finish();
        std::process::exit(0);
    }

    pub fn finish() {
        let universe = UNIVERSE.lock().map(|mut u| u.take());
        drop(universe);
    }

    /// Seconds a collective may wait for the other ranks.
    fn timeout() -> Duration {
        let secs = std::env::var("Q3C_MPI_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(300.0);
        Duration::from_secs_f64(secs)
    }

    /// The ranks of `MPI_COMM_WORLD`. One call at a time (MPI is started `MPI_THREAD_SERIALIZED`: calls
    /// come from whichever thread runs the model's forward calls).
    struct MpiTransport {
        rank: usize,
        ranks: usize,
        timeout: Duration,
        calls: Mutex<()>,
    }

    impl MpiTransport {
        fn start() -> Result<MpiTransport> {
            let mut universe = UNIVERSE
                .lock()
                .map_err(|_| anyhow::anyhow!("MPI state poisoned"))?;
            if universe.is_none() {
                let (u, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                    .context("MPI cannot be started")?;
                *universe = Some(u);
            }
            let world = world();
            Ok(MpiTransport {
                rank: world.rank() as usize,
                ranks: world.size() as usize,
                timeout: timeout(),
                calls: Mutex::new(()),
            })
        }

        fn abort(&self) -> ! {
            world().abort(1)
        }
    }

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    /// Waits for `req`: spinning at first (a decode step's collectives take microseconds), then sleeping
    /// (an idle follower must not burn a core); `deadline` past, aborts the job saying what waited.
    fn complete<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
        mut req: mpi::request::Request<'a, D, S>,
        deadline: Option<(Instant, &str, usize)>,
    ) {
        let begun = Instant::now();
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            let waited = begun.elapsed();
            if let Some((at, what, rank)) = deadline {
                if Instant::now() > at {
                    eprintln!(
                        "error: rank {rank}: {what} waited {:.0} s for the other ranks: one of them died or hangs (Q3C_MPI_TIMEOUT sets the limit)",
                        waited.as_secs_f64()
                    );
                    world().abort(1);
                }
            }
            if waited < Duration::from_millis(2) {
                std::hint::spin_loop();
            } else if waited < Duration::from_millis(50) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }

    impl Transport for MpiTransport {
        fn rank(&self) -> usize {
            self.rank
        }

        fn ranks(&self) -> usize {
            self.ranks
        }

        fn broadcast(&self, bytes: &mut Vec<u8>) {
            let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let world = world();
            let root = world.process_at_rank(0);
            // Rank 0 sends when it has something to say: the others wait for it as long as it takes.
            let mut len = bytes.len() as u64;
            let deadline = (self.rank == 0).then(|| {
                (
                    Instant::now() + self.timeout,
                    "a message to the other ranks",
                    0,
                )
            });
            mpi::request::scope(|scope| {
                complete(root.immediate_broadcast_into(scope, &mut len), deadline)
            });
            bytes.resize(len as usize, 0);
            let deadline = Some((
                Instant::now() + self.timeout,
                "a message from rank 0",
                self.rank,
            ));
            mpi::request::scope(|scope| {
                complete(
                    root.immediate_broadcast_into(scope, &mut bytes[..]),
                    deadline,
                )
            });
        }

        fn all_reduce(&self, x: &[f32], out: &mut [f32]) {
            let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let world = world();
            let deadline = Some((Instant::now() + self.timeout, "an all-reduce", self.rank));
            mpi::request::scope(|scope| {
                let req = world.immediate_all_reduce_into(scope, x, out, SystemOperation::sum());
                complete(req, deadline)
            });
        }

        fn all_gather(&self, x: &[f32], out: &mut [f32]) {
            let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let world = world();
            let deadline = Some((Instant::now() + self.timeout, "an all-gather", self.rank));
            mpi::request::scope(|scope| {
                complete(world.immediate_all_gather_into(scope, x, out), deadline)
            });
        }
    }
}
