//! The thread pool lent to artifacts as `parallel_for`: persistent workers, the caller thread takes part.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use q3c_abi::Kernel;

/// Spins on the generation counter this many times before parking: kernels follow each other within
/// microseconds during a forward pass, and a futex wake-up costs more than the wait.
const SPINS: u32 = 20_000;

/// Each job is cut into this many chunks per thread, claimed in turn by whichever thread is free: the two
/// threads of one core do not run at the same speed, and with one half each the faster waited for the slower
/// (10% of decode spent spinning; 3% with eight chunks per thread).
const CHUNKS_PER_THREAD: u64 = 8;

#[derive(Clone, Copy)]
struct Job {
    kernel: Kernel,
    args: usize,
    n: u64,
    /// The job's generation (see [`Shared::next`]).
    generation: u64,
}

struct Shared {
    /// Bumped once per job; workers run a job when they see it change.
    generation: AtomicU64,
    job: Mutex<Option<Job>>,
    /// Chunks of the current job finished.
    done: AtomicU64,
    /// The next unclaimed chunk of the current job, tagged with the job's generation in the high 32 bits:
    /// a worker that read an older job fails to claim (its compare-exchange sees another tag), so the
    /// caller waits only for chunks actually claimed — never for a worker that has not woken up yet (under
    /// CPU contention a descheduled worker used to hold every kernel up for a time slice).
    next: AtomicU64,
    shutdown: AtomicBool,
    /// Parked workers wait here; `parked` guards against lost wake-ups.
    parked: Mutex<usize>,
    wake: Condvar,
    threads: usize,
}

/// A fixed set of threads that run kernels over split ranges.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// Chunk `i` of `chunks` of `n` items.
fn chunk(n: u64, i: u64, chunks: u64) -> (u64, u64) {
    (n * i / chunks, n * (i + 1) / chunks)
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller's included); at least 1.
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicU64::new(0),
            next: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            threads,
        });
        let workers = (1..threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("q3c-worker-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `kernel(args, s, e)` over ranges covering `[0, n)` and returns when all are done.
    ///
    /// # Safety
    /// `kernel` must be safe to call concurrently on disjoint ranges with `args`, which must stay valid
    /// until this returns.
    pub unsafe fn run(&self, kernel: Kernel, args: *const u64, n: u64) {
        let sh = &*self.shared;
        if sh.threads == 1 || n <= 1 {
            kernel(args, 0, n);
            return;
        }
        let generation = sh.generation.load(Ordering::Acquire) + 1;
        let job = Job {
            kernel,
            args: args as usize,
            n,
            generation,
        };
        *sh.job.lock().expect("pool lock") = Some(job);
        sh.done.store(0, Ordering::Release);
        sh.next.store(tag(generation), Ordering::Release);
        sh.generation.store(generation, Ordering::Release);
        if *sh.parked.lock().expect("pool lock") > 0 {
            sh.wake.notify_all();
        }
        run_chunks(sh, job);
        let chunks = chunks_of(sh, n);
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) < chunks {
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The chunk counter's value for the first chunk of generation `generation`.
fn tag(generation: u64) -> u64 {
    (generation & 0xffff_ffff) << 32
}

/// Chunks a job of `n` items is cut into.
fn chunks_of(sh: &Shared, n: u64) -> u64 {
    (sh.threads as u64 * CHUNKS_PER_THREAD).min(n)
}

/// Claims chunks of `job` until none are left (or another job has replaced it) and runs them, counting each
/// finished one.
unsafe fn run_chunks(sh: &Shared, job: Job) {
    let chunks = chunks_of(sh, job.n);
    let mine = tag(job.generation);
    let mut seen = sh.next.load(Ordering::Acquire);
    loop {
        if seen & !0xffff_ffff != mine || seen - mine >= chunks {
            return;
        }
        match sh
            .next
            .compare_exchange_weak(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                let (s, e) = chunk(job.n, seen - mine, chunks);
                (job.kernel)(job.args as *const u64, s, e);
                sh.done.fetch_add(1, Ordering::AcqRel);
                seen = sh.next.load(Ordering::Acquire);
            }
            Err(now) => seen = now,
        }
    }
}

fn worker(sh: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin first, then park.
        let mut spins = 0u32;
        loop {
            if sh.shutdown.load(Ordering::Acquire) {
                return;
            }
            if sh.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            let mut parked = sh.parked.lock().expect("pool lock");
            *parked += 1;
            while sh.generation.load(Ordering::Acquire) == seen
                && !sh.shutdown.load(Ordering::Acquire)
            {
                parked = sh.wake.wait(parked).expect("pool lock");
            }
            *parked -= 1;
        }
        seen = sh.generation.load(Ordering::Acquire);
        let job = sh
            .job
            .lock()
            .expect("pool lock")
            .expect("a job comes with a new generation");
        // SAFETY: the caller of `run` keeps the kernel and args valid until every chunk it counts is done,
        // and a chunk of this job can only be claimed while the counter still carries its generation.
        unsafe { run_chunks(sh, job) };
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let _guard = self.shared.parked.lock().expect("pool lock");
        self.shared.wake.notify_all();
        drop(_guard);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// `q3c_services.parallel_for`: `pool` is a `*const ThreadPool`.
pub unsafe extern "C" fn parallel_for(
    pool: *mut std::ffi::c_void,
    kernel: Kernel,
    args: *const u64,
    n: u64,
) {
    let pool = &*(pool as *const ThreadPool);
    pool.run(kernel, args, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    unsafe extern "C" fn add_range(args: *const u64, start: u64, end: u64) {
        let counter = &*(args as *const AtomicU64);
        for i in start..end {
            counter.fetch_add(i + 1, Ordering::Relaxed);
        }
    }

    /// Thousands of jobs back to back, where workers wake late or not at all between them: every item of
    /// every job still runs exactly once, and no worker runs an item of a job that has ended.
    #[test]
    fn back_to_back_jobs_never_mix() {
        let pool = ThreadPool::new(3);
        for round in 0..20_000u64 {
            let n = round % 37;
            let counter = AtomicU64::new(0);
            unsafe { pool.run(add_range, &counter as *const AtomicU64 as *const u64, n) };
            assert_eq!(
                counter.load(Ordering::Relaxed),
                n * (n + 1) / 2,
                "round {round}"
            );
        }
    }

    #[test]
    fn every_item_runs_once_for_any_thread_count() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            for n in [0u64, 1, 2, 7, 1000] {
                let counter = AtomicU64::new(0);
                unsafe { pool.run(add_range, &counter as *const AtomicU64 as *const u64, n) };
                assert_eq!(
                    counter.load(Ordering::Relaxed),
                    n * (n + 1) / 2,
                    "threads {threads}, n {n}"
                );
            }
        }
    }
}
