//! The thread pool lent to artifacts as `parallel_for`: persistent workers, the caller thread takes part.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use q3c_abi::Kernel;

/// Spins on the generation counter this many times before parking: kernels follow each other within
/// microseconds during a forward pass, and a futex wake-up costs more than the wait.
const SPINS: u32 = 20_000;

#[derive(Clone, Copy)]
struct Job {
    kernel: Kernel,
    args: usize,
    n: u64,
}

struct Shared {
    /// Bumped once per job; workers run a job when they see it change.
    generation: AtomicU64,
    job: Mutex<Option<Job>>,
    /// Workers still running the current job.
    remaining: AtomicUsize,
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

/// The range thread `i` of `threads` takes out of `n` items.
fn chunk(n: u64, i: usize, threads: usize) -> (u64, u64) {
    let (i, t) = (i as u64, threads as u64);
    (n * i / t, n * (i + 1) / t)
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller's included); at least 1.
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            remaining: AtomicUsize::new(0),
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
                    .spawn(move || worker(&shared, i))
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
        *sh.job.lock().expect("pool lock") = Some(Job {
            kernel,
            args: args as usize,
            n,
        });
        sh.remaining.store(sh.threads - 1, Ordering::Release);
        sh.generation.fetch_add(1, Ordering::AcqRel);
        if *sh.parked.lock().expect("pool lock") > 0 {
            sh.wake.notify_all();
        }
        let (s, e) = chunk(n, 0, sh.threads);
        if s < e {
            kernel(args, s, e);
        }
        let mut spins = 0u32;
        while sh.remaining.load(Ordering::Acquire) > 0 {
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker(sh: &Shared, index: usize) {
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
        let (s, e) = chunk(job.n, index, sh.threads);
        if s < e {
            // SAFETY: the caller of `run` keeps the kernel and args valid until every worker is done.
            unsafe { (job.kernel)(job.args as *const u64, s, e) };
        }
        sh.remaining.fetch_sub(1, Ordering::AcqRel);
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
