//! The thread pool lent to artifacts as `parallel_for`: persistent workers, the caller thread takes part.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use q3c_abi::Kernel;

#[derive(Clone, Copy)]
struct Job {
    kernel: Kernel,
    args: usize,
    n: u64,
}

struct State {
    generation: u64,
    job: Option<Job>,
    remaining: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    start: Condvar,
    done: Condvar,
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
            state: Mutex::new(State {
                generation: 0,
                job: None,
                remaining: 0,
                shutdown: false,
            }),
            start: Condvar::new(),
            done: Condvar::new(),
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
        let threads = self.shared.threads;
        if threads == 1 || n <= 1 {
            kernel(args, 0, n);
            return;
        }
        {
            let mut st = self.shared.state.lock().expect("pool lock");
            st.job = Some(Job {
                kernel,
                args: args as usize,
                n,
            });
            st.remaining = threads - 1;
            st.generation += 1;
        }
        self.shared.start.notify_all();
        let (s, e) = chunk(n, 0, threads);
        if s < e {
            kernel(args, s, e);
        }
        let mut st = self.shared.state.lock().expect("pool lock");
        while st.remaining > 0 {
            st = self.shared.done.wait(st).expect("pool lock");
        }
        st.job = None;
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let job = {
            let mut st = shared.state.lock().expect("pool lock");
            while st.generation == seen && !st.shutdown {
                st = shared.start.wait(st).expect("pool lock");
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job.expect("a job comes with a new generation")
        };
        let (s, e) = chunk(job.n, index, shared.threads);
        if s < e {
            // SAFETY: the caller of `run` guarantees the kernel and args are valid until all workers finish.
            unsafe { (job.kernel)(job.args as *const u64, s, e) };
        }
        let mut st = shared.state.lock().expect("pool lock");
        st.remaining -= 1;
        if st.remaining == 0 {
            shared.done.notify_one();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.state.lock().expect("pool lock").shutdown = true;
        self.shared.start.notify_all();
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
