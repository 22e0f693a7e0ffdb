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

/// What `q3c probe --all-reduce` measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AllReduceProbe {
    pub ranks: usize,
    pub floats: usize,
    pub reps: usize,
    /// Median seconds of one all-reduce, as rank 0 times it (after the ranks meet at a first one).
    pub median_s: f64,
}

/// Times all-reduces of `floats` f32 among the ranks `mpirun` started; `None` on ranks other than 0.
pub fn probe_all_reduce(floats: usize) -> Result<Option<AllReduceProbe>> {
    imp::probe_all_reduce(floats)
}

/// Ends MPI, where this process started it: finalised after success (rank 0's model, dropped or released,
/// has stopped the others), the whole job aborted after a failure (the others may be waiting for this rank).
pub fn finish(success: bool) {
    #[cfg(feature = "mpi")]
    imp::finish(success);
    #[cfg(not(feature = "mpi"))]
    let _ = success;
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

    pub fn probe_all_reduce(_: usize) -> Result<Option<AllReduceProbe>> {
        anyhow::bail!("--all-reduce needs a q3c built with the `mpi` feature (./x build)")
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
    /// Whether MPI runs with MPI_THREAD_MULTIPLE (else the watchdog ends the process without MPI).
    static MULTIPLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
            // `finish` then aborts the job.
            Err(e) => bail!("rank {rank}: {e}"),
        };
        // Every rank loaded before any runs (a slow one must not time out the first collective).
        {
            let _one = transport.calls.lock().unwrap_or_else(|e| e.into_inner());
            idle_wait(world().immediate_barrier());
        }
        if rank == 0 {
            return Ok(model);
        }
        if let Err(e) = model.follow() {
            eprintln!("error: rank {rank}: {e}");
            transport.abort();
        }
        drop(model);
        finish(true);
        std::process::exit(0);
    }

    pub fn finish(success: bool) {
        let universe = UNIVERSE.lock().map(|mut u| u.take());
        if let (Ok(Some(_)), false) = (&universe, success) {
            world().abort(1);
        }
        drop(universe);
    }

    pub fn probe_all_reduce(floats: usize) -> Result<Option<AllReduceProbe>> {
        if launched_ranks().is_none() {
            bail!("--all-reduce measures the ranks of a job: run it as `mpirun -np N q3c probe --all-reduce {floats}`");
        }
        let t = MpiTransport::start()?;
        let x = vec![1f32; floats];
        let mut out = vec![0f32; floats];
        t.all_reduce(&x, &mut out);
        let reps = 1000;
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let start = Instant::now();
                t.all_reduce(&x, &mut out);
                start.elapsed().as_secs_f64()
            })
            .collect();
        if out[0] != t.ranks() as f32 {
            bail!("the all-reduce summed to {}, not {}", out[0], t.ranks());
        }
        times.sort_by(f64::total_cmp);
        Ok((t.rank() == 0).then(|| AllReduceProbe {
            ranks: t.ranks(),
            floats,
            reps,
            median_s: times[reps / 2],
        }))
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

    /// The ranks of `MPI_COMM_WORLD`. One call at a time (from whichever thread runs the model's forward
    /// calls), but for the watchdog's abort.
    struct MpiTransport {
        rank: usize,
        ranks: usize,
        calls: Mutex<()>,
        watch: Arc<Watch>,
    }

    /// What the watchdog thread looks at: the collective under way, if any, and when it must be done.
    struct Watch {
        armed: Mutex<Option<(Instant, &'static str)>>,
        timeout: Duration,
    }

    impl MpiTransport {
        fn start() -> Result<MpiTransport> {
            let mut universe = UNIVERSE
                .lock()
                .map_err(|_| anyhow::anyhow!("MPI state poisoned"))?;
            if universe.is_none() {
                // The model's forward calls come from whichever thread runs them, one at a time; only the
                // watchdog's abort may come during another call, which MPI_THREAD_MULTIPLE allows.
                let (u, level) = mpi::initialize_with_threading(mpi::Threading::Multiple)
                    .context("MPI cannot be started")?;
                if matches!(level, mpi::Threading::Single | mpi::Threading::Funneled) {
                    bail!("this MPI library offers threads {level:?}; q3c needs at least MPI_THREAD_SERIALIZED");
                }
                MULTIPLE.store(
                    level == mpi::Threading::Multiple,
                    std::sync::atomic::Ordering::Relaxed,
                );
                *universe = Some(u);
            }
            let comm = world();
            let rank = comm.rank() as usize;
            let watch = Arc::new(Watch {
                armed: Mutex::new(None),
                timeout: timeout(),
            });
            let w = watch.clone();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                let overdue = w
                    .armed
                    .lock()
                    .ok()
                    .and_then(|a| a.filter(|(at, _)| Instant::now() > *at));
                if let Some((_, what)) = overdue {
                    eprintln!(
                        "error: rank {rank}: {what} waited {:.0} s for the other ranks: one of them died or hangs (Q3C_MPI_TIMEOUT sets the limit)",
                        w.timeout.as_secs_f64()
                    );
                    if MULTIPLE.load(std::sync::atomic::Ordering::Relaxed) {
                        world().abort(1);
                    }
                    // Without MPI: a rank that exits without finalising ends the job (mpirun stops the rest).
                    std::process::exit(1);
                }
            });
            Ok(MpiTransport {
                rank,
                ranks: comm.size() as usize,
                calls: Mutex::new(()),
                watch,
            })
        }

        fn abort(&self) -> ! {
            world().abort(1)
        }

        /// Runs the collective `f` (one at a time), the watchdog ending the job if it takes past the timeout.
        /// Blocking MPI calls: over shared memory an all-reduce of 1024 floats takes 1 µs this way and 7 µs
        /// polling a non-blocking one.
        fn guarded<R>(&self, what: &'static str, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
            let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let arm = |v| *self.watch.armed.lock().unwrap_or_else(|e| e.into_inner()) = v;
            arm(Some((Instant::now() + self.watch.timeout, what)));
            let r = f(&world());
            arm(None);
            r
        }
    }

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    /// Waits for `req` as long as it takes, without burning a core: spinning at first (the next message
    /// of a decoding model comes within microseconds), then yielding, then sleeping.
    fn idle_wait<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
        mut req: mpi::request::Request<'a, D, S>,
    ) {
        let begun = Instant::now();
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            let waited = begun.elapsed();
            if waited < Duration::from_millis(2) {
                std::hint::spin_loop();
            } else if waited < Duration::from_millis(50) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
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
            // The length goes as a non-blocking broadcast on every rank (blocking and non-blocking
            // collectives do not match each other): the other ranks wait for rank 0's next message as long
            // as it takes (an idle server), polling; rank 0's send is guarded like any collective.
            let mut len = bytes.len() as u64;
            let mut send_len = |w: &SimpleCommunicator| {
                let root = w.process_at_rank(0);
                mpi::request::scope(|scope| {
                    idle_wait(root.immediate_broadcast_into(scope, &mut len))
                })
            };
            if self.rank == 0 {
                self.guarded("a message to the other ranks", send_len);
            } else {
                let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
                send_len(&world());
            }
            bytes.resize(len as usize, 0);
            self.guarded("a message from rank 0", |w| {
                w.process_at_rank(0).broadcast_into(&mut bytes[..])
            });
        }

        fn all_reduce(&self, x: &[f32], out: &mut [f32]) {
            self.guarded("an all-reduce", |w| {
                w.all_reduce_into(x, out, SystemOperation::sum())
            });
        }

        fn all_gather(&self, x: &[f32], out: &mut [f32]) {
            self.guarded("an all-gather", |w| w.all_gather_into(x, out));
        }
    }
}
