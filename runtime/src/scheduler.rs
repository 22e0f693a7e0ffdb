//! Continuous batching: one thread owns a [`Batch`] and runs every step for all the sequences that have
//! work, so that concurrent conversations share each read of the weights.
//!
//! Callers keep their own decoding loops (`chat::decode`, `generate`): each holds a [`BatchedSession`],
//! a [`Session`] whose `forward_last` hands its ids to the scheduler and waits for its row of logits. The
//! scheduler gathers the feeds that arrive together — after a step it waits for the sequences it just
//! answered to come back with their next token, up to a quarter of the step's time and at least 50 ms,
//! unless they said they are idle; woken from idle, it gathers requests while they keep arriving — and runs
//! them as one batched step: decode tokens first, then prompt chunks up to a per-step token budget while
//! any sequence is decoding (chunked prefill: a long prompt is fed over several steps and does not stall
//! the others), or the waiting prompts whole, up to four budgets, when none is. Sequences join and leave
//! between steps; dropping a session frees its sequence's KV blocks. Every way out of a decoding loop
//! (done, failed, cancelled) gives its session back idle or drops it, so the wait is only paid for a loop
//! that is late (a starved thread, a client reading slowly).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::{Batch, SeqId};
use crate::error::RuntimeError;
use crate::model::Model;
use crate::session::{Logits, Session};
use crate::stats::Histogram;

/// What sessions ask of the scheduler thread.
enum Msg {
    Open(Sender<SeqId>),
    Feed {
        seq: SeqId,
        ids: Vec<u32>,
        reply: Sender<Result<Vec<f32>, RuntimeError>>,
    },
    Fork {
        from: SeqId,
        len: usize,
        reply: Sender<Result<SeqId, RuntimeError>>,
    },
    Truncate(SeqId, usize),
    Idle(SeqId),
    Close(SeqId),
}

/// A feed being run: `done` of its ids fed so far.
struct Job {
    seq: SeqId,
    ids: Vec<u32>,
    done: usize,
    reply: Sender<Result<Vec<f32>, RuntimeError>>,
}

/// The handle of a scheduler thread (which ends when every handle and session is dropped).
#[derive(Clone)]
pub struct Scheduler {
    tx: Sender<Msg>,
    vocab: usize,
    stats: Arc<BatchStats>,
}

/// What the scheduler has run (relaxed atomics, for metrics).
#[derive(Default, Debug)]
pub struct BatchStats {
    /// Batched steps run.
    pub steps: AtomicU64,
    /// Sequences fed, summed over the steps (÷ steps: the mean batch).
    pub sequences: AtomicU64,
    /// Tokens fed, summed over the steps.
    pub tokens: AtomicU64,
    /// Tokens of KV cache the sequences hold, and the most the cache may hold.
    pub kv_in_use: AtomicU64,
    pub kv_capacity: AtomicU64,
    /// Seconds between consecutive answers to one sequence while its decoding loop runs: the latency of
    /// each token as that loop sees it.
    pub inter_token: Histogram,
}

/// Longest a step waits for sequences to come back: a share of the last step's time, but at least
/// [`MIN_WAIT`] (a loaded machine may not run a woken thread within a fraction of a short step). Sessions
/// that will not come back soon say so ([`BatchedSession::idle`]), so the wait is only paid for a decoding
/// loop that is late.
const WAIT_SHARE: f64 = 0.25;
const MIN_WAIT: Duration = Duration::from_millis(50);

/// A scheduler woken from idle by a request keeps gathering the requests that follow it while they come
/// within this of each other (up to [`GATHER_MAX`] in all), so that requests sent together are read in one
/// step and then decode in lockstep: started one by one, every later prompt was read in a step the earlier
/// streams waited on, and those steps were the longest gaps between their tokens (8 clients: p99 336–468 ms;
/// gathered, 99–185 ms, with the same aggregate throughput; docs/BENCHMARKS.md).
const GATHER_QUIET: Duration = Duration::from_millis(10);
/// The longest a request arriving at an idle server waits for others to gather with it.
const GATHER_MAX: Duration = Duration::from_millis(50);
/// Budgets of prompt tokens a step takes when no sequence is decoding (see [`run`]).
const IDLE_STEP_FACTOR: usize = 4;

impl Scheduler {
    /// Starts the thread, with a KV cache of `tokens` tokens shared by all sequences and at most
    /// `step_tokens` tokens per step (decode tokens always run; prompts fill the rest).
    pub fn start(model: &'static Model, tokens: usize, step_tokens: usize) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let batch = model.batch(tokens);
        let vocab = batch.vocab_size();
        let stats = Arc::new(BatchStats::default());
        stats
            .kv_capacity
            .store(batch.capacity() as u64, Ordering::Relaxed);
        let counted = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("q3c-scheduler".into())
            .spawn(move || run(batch, rx, step_tokens.max(1), &counted))
            .expect("spawning the scheduler thread");
        Scheduler { tx, vocab, stats }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<BatchStats> {
        Arc::clone(&self.stats)
    }

    /// A new, empty sequence.
    pub fn session(&self) -> BatchedSession {
        let (tx, rx) = mpsc::channel();
        let seq = match self.tx.send(Msg::Open(tx)) {
            Ok(()) => rx.recv().ok(),
            Err(_) => None,
        };
        BatchedSession {
            tx: self.tx.clone(),
            seq,
            position: 0,
            vocab: self.vocab,
        }
    }
}

/// One sequence fed through a [`Scheduler`].
pub struct BatchedSession {
    tx: Sender<Msg>,
    /// `None` if the scheduler had stopped when it was opened.
    seq: Option<SeqId>,
    position: usize,
    vocab: usize,
}

impl BatchedSession {
    fn stopped() -> RuntimeError {
        RuntimeError::Internal("the batch scheduler has stopped".into())
    }

    /// Tells the scheduler not to wait for this session's next feed (its decoding loop has ended for now).
    pub fn idle(&self) {
        if let Some(seq) = self.seq {
            let _ = self.tx.send(Msg::Idle(seq));
        }
    }

    /// A new session holding this one's first `len` tokens (at most those it holds), sharing their cache
    /// instead of recomputing it ([`Batch::fork`]).
    pub fn fork(&self, len: usize) -> Result<BatchedSession, RuntimeError> {
        let from = self.seq.ok_or_else(Self::stopped)?;
        let (reply, answer) = mpsc::channel();
        self.tx
            .send(Msg::Fork { from, len, reply })
            .map_err(|_| Self::stopped())?;
        let seq = answer.recv().map_err(|_| Self::stopped())??;
        Ok(BatchedSession {
            tx: self.tx.clone(),
            seq: Some(seq),
            position: len.min(self.position),
            vocab: self.vocab,
        })
    }
}

impl Session for BatchedSession {
    /// Every row's logits: the ids are fed one step each (only `forward_last` is batched in bulk).
    fn forward(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        let start = self.position;
        let mut data = Vec::with_capacity(ids.len() * self.vocab);
        for &id in ids {
            match self.forward_last(&[id]) {
                Ok(row) => data.extend(row),
                Err(e) => {
                    self.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(Logits {
            rows: ids.len(),
            vocab: self.vocab,
            data,
        })
    }

    fn forward_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let seq = self.seq.ok_or_else(Self::stopped)?;
        if ids.is_empty() {
            return Err(RuntimeError::Input("no token ids to run".into()));
        }
        let (reply, answer) = mpsc::channel();
        self.tx
            .send(Msg::Feed {
                seq,
                ids: ids.to_vec(),
                reply,
            })
            .map_err(|_| Self::stopped())?;
        let row = answer.recv().map_err(|_| Self::stopped())??;
        self.position += ids.len();
        Ok(row)
    }

    fn position(&self) -> usize {
        self.position
    }

    fn reset(&mut self) {
        self.truncate(0);
    }

    fn truncate(&mut self, len: usize) {
        self.position = self.position.min(len);
        if let Some(seq) = self.seq {
            let _ = self.tx.send(Msg::Truncate(seq, self.position));
        }
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

impl Drop for BatchedSession {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            let _ = self.tx.send(Msg::Close(seq));
        }
    }
}

/// The scheduler thread: gathers feeds, runs steps, answers.
fn run(
    mut batch: Box<dyn Batch + Send + '_>,
    rx: Receiver<Msg>,
    step_tokens: usize,
    stats: &BatchStats,
) {
    let mut jobs: Vec<Job> = Vec::new();
    // Sequences answered by the last step, expected back with their next token.
    let mut awaited: HashSet<SeqId> = HashSet::new();
    let mut last_step = Duration::ZERO;
    // When each running sequence was last answered (forgotten when it goes idle or closes).
    let mut answered_at: HashMap<SeqId, Instant> = HashMap::new();
    loop {
        // After the last step or the messages handled since (closes, forks, truncations).
        stats
            .kv_in_use
            .store(batch.in_use() as u64, Ordering::Relaxed);
        // Idle: block for the next message.
        let idle = jobs.is_empty() && answered_at.is_empty();
        if jobs.is_empty() {
            match rx.recv() {
                Ok(msg) => handle(msg, &mut *batch, &mut jobs, &mut awaited, &mut answered_at),
                Err(_) => return,
            }
        }
        // Woken from idle: gather the requests arriving together (see [`GATHER_QUIET`]).
        if idle {
            let woke = Instant::now();
            let mut last = woke;
            loop {
                let until = (last + GATHER_QUIET).min(woke + GATHER_MAX);
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(msg) => {
                        handle(msg, &mut *batch, &mut jobs, &mut awaited, &mut answered_at);
                        last = Instant::now();
                    }
                    Err(_) => break,
                }
            }
        }
        // Gather what is queued, then wait (a while) for the sequences still awaited.
        let deadline = Instant::now() + last_step.mul_f64(WAIT_SHARE).max(MIN_WAIT);
        loop {
            let msg = match rx.try_recv() {
                Ok(msg) => msg,
                Err(_) if awaited.is_empty() || jobs.is_empty() => break,
                Err(_) => match rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) if jobs.is_empty() => return,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            handle(msg, &mut *batch, &mut jobs, &mut awaited, &mut answered_at);
        }
        if jobs.is_empty() {
            continue;
        }
        let started = Instant::now();
        // With sequences decoding, prompt chunks are held to the step budget, so those wait at most that;
        // with none, nobody waits on the step, and the prompts gathered go in whole (up to
        // IDLE_STEP_FACTOR budgets), so that requests which arrived together start decoding together.
        let budget = if answered_at.is_empty() {
            step_tokens * IDLE_STEP_FACTOR
        } else {
            step_tokens
        };
        awaited = step(&mut *batch, &mut jobs, budget, stats);
        let now = Instant::now();
        for &seq in &awaited {
            if let Some(before) = answered_at.insert(seq, now) {
                stats
                    .inter_token
                    .observe(now.duration_since(before).as_secs_f64());
            }
        }
        last_step = started.elapsed();
    }
}

/// Applies one message.
fn handle(
    msg: Msg,
    batch: &mut dyn Batch,
    jobs: &mut Vec<Job>,
    awaited: &mut HashSet<SeqId>,
    answered_at: &mut HashMap<SeqId, Instant>,
) {
    match msg {
        Msg::Open(reply) => {
            let _ = reply.send(batch.open());
        }
        // A feed with bad ids fails its step, whose feeds then run one by one (see `step`): only it fails.
        Msg::Feed { seq, ids, reply } => {
            awaited.remove(&seq);
            jobs.push(Job {
                seq,
                ids,
                done: 0,
                reply,
            });
        }
        Msg::Fork { from, len, reply } => {
            let _ = reply.send(batch.fork(from, len));
        }
        Msg::Truncate(seq, len) => batch.truncate(seq, len),
        Msg::Idle(seq) => {
            awaited.remove(&seq);
            answered_at.remove(&seq);
        }
        Msg::Close(seq) => {
            awaited.remove(&seq);
            answered_at.remove(&seq);
            batch.close(seq);
        }
    }
}

/// Runs one step over `jobs` (single tokens first, then prompt chunks within `step_tokens`), answers the
/// jobs it finishes, and returns their sequences.
fn step(
    batch: &mut dyn Batch,
    jobs: &mut Vec<Job>,
    step_tokens: usize,
    stats: &BatchStats,
) -> HashSet<SeqId> {
    // Decode tokens first (they cannot wait), then the oldest prompts.
    jobs.sort_by_key(|j| j.ids.len() - j.done > 1);
    let mut budget = step_tokens;
    let mut taken: Vec<(usize, usize)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let left = job.ids.len() - job.done;
        let n = if left == 1 { 1 } else { left.min(budget) };
        if n == 0 {
            continue;
        }
        budget = budget.saturating_sub(n);
        taken.push((i, n));
    }
    let work: Vec<(SeqId, &[u32])> = taken
        .iter()
        .map(|&(i, n)| (jobs[i].seq, &jobs[i].ids[jobs[i].done..jobs[i].done + n]))
        .collect();
    stats.steps.fetch_add(1, Ordering::Relaxed);
    stats
        .sequences
        .fetch_add(work.len() as u64, Ordering::Relaxed);
    let tokens: usize = work.iter().map(|(_, ids)| ids.len()).sum();
    stats.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    let results: Vec<Result<Vec<f32>, RuntimeError>> = match batch.forward_last(&work) {
        Ok(rows) => rows.into_iter().map(Ok).collect(),
        // One feed's failure (a full cache, a bad id) must not fail the others: run them one by one.
        Err(_) if work.len() > 1 => work
            .iter()
            .map(|w| {
                batch
                    .forward_last(std::slice::from_ref(w))
                    .map(|mut r| r.remove(0))
            })
            .collect(),
        Err(e) => vec![Err(e)],
    };
    let mut answered = HashSet::new();
    let mut finished = vec![false; jobs.len()];
    for (&(i, n), result) in taken.iter().zip(results) {
        let job = &mut jobs[i];
        match result {
            Ok(row) => {
                job.done += n;
                if job.done == job.ids.len() {
                    // A client that has gone away no longer listens; its session's drop closes the sequence.
                    let _ = job.reply.send(Ok(row));
                    answered.insert(job.seq);
                    finished[i] = true;
                }
            }
            Err(e) => {
                // Undo the chunks already fed, so the session is as it was.
                let held = batch.position(job.seq);
                batch.truncate(job.seq, held - job.done);
                let _ = job.reply.send(Err(e));
                finished[i] = true;
            }
        }
    }
    let mut i = 0;
    jobs.retain(|_| {
        i += 1;
        !finished[i - 1]
    });
    answered
}
