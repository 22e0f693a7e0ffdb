//! Sharded models: one process per rank, each binding its slice of the weights (the manifest's `ranks`
//! and weight shards), whose forward calls meet in the artifact's collectives.
//!
//! Rank 0 runs the model as any other — sessions, batches, the scheduler, the server — and mirrors what
//! the other ranks must do alike: every forward call (its rows, positions, sequences, block tables and
//! logit rows) and every change to a KV pool's memory (created, resized, blocks copied, dropped), so their
//! pools hold the same blocks under the same numbers. The other ranks replay those messages on their own
//! slices ([`CompiledModel::follow`]) until rank 0's model is dropped. A collective inside a forward call (an
//! all-reduce after each attention and MLP block, an all-gather of the logits) reaches
//! `q3c_services.collective`, which this module implements over a [`Transport`]: MPI between processes
//! (the CLI's `mpi` feature), or threads of one process ([`ThreadTransport`], for tests).
//!
//! One lock (the link's turn) keeps a forward call and its collectives, and each pool message, in one
//! order on every rank: messages and collectives share the transport, which carries one at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};

use q3c_abi::launch::Collective;

use super::kv::{HostKv, KvMemory};
use super::CompiledModel;
use crate::error::RuntimeError;

/// How the ranks of a sharded model reach each other. Every rank calls each method in the same order
/// (they are collectives); a transport that cannot complete one ends the job.
pub trait Transport: Send + Sync {
    /// This process's rank, `0..ranks()`.
    fn rank(&self) -> usize;
    /// Ranks in the job.
    fn ranks(&self) -> usize;
    /// Rank 0's `bytes`, in `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>);
    /// The element-wise sum of every rank's `x` (all of `out`'s length), in `out`.
    fn all_reduce(&self, x: &[f32], out: &mut [f32]);
    /// Every rank's `x` (all of one length), one after another by rank, in `out`.
    fn all_gather(&self, x: &[f32], out: &mut [f32]);
}

/// The ranks of one process, each a thread with its own [`ThreadTransport`]: what the tests shard over.
pub struct ThreadTransport {
    rank: usize,
    ranks: usize,
    shared: Arc<Exchange>,
}

/// What the threads of a [`ThreadTransport`] exchange through: each rank's contribution, between barriers.
struct Exchange {
    slots: Mutex<Vec<Vec<u8>>>,
    barrier: Barrier,
}

impl ThreadTransport {
    /// One transport per rank of a job of `ranks` threads.
    pub fn world(ranks: usize) -> Vec<ThreadTransport> {
        let shared = Arc::new(Exchange {
            slots: Mutex::new(vec![Vec::new(); ranks]),
            barrier: Barrier::new(ranks),
        });
        (0..ranks)
            .map(|rank| ThreadTransport {
                rank,
                ranks,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `mine`, by rank.
    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        let lock = || self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        lock()[self.rank] = mine;
        self.shared.barrier.wait();
        let all = lock().clone();
        // Nobody writes a slot again before everyone has read them all.
        self.shared.barrier.wait();
        all
    }
}

fn floats_to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_to_floats(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) {
        let mine = if self.rank == 0 {
            bytes.clone()
        } else {
            Vec::new()
        };
        *bytes = self.exchange(mine).swap_remove(0);
    }

    fn all_reduce(&self, x: &[f32], out: &mut [f32]) {
        let all = self.exchange(floats_to_bytes(x));
        out.fill(0.0);
        // In rank order, as every rank adds them.
        for part in &all {
            for (o, v) in out.iter_mut().zip(bytes_to_floats(part)) {
                *o += v;
            }
        }
    }

    fn all_gather(&self, x: &[f32], out: &mut [f32]) {
        let all = self.exchange(floats_to_bytes(x));
        for (o, v) in out
            .iter_mut()
            .zip(all.iter().flat_map(|p| bytes_to_floats(p)))
        {
            *o = v;
        }
    }
}

/// A model's way to its other ranks.
pub(crate) struct Link {
    transport: Arc<dyn Transport>,
    /// Held by rank 0 across each message and forward call (see the module documentation).
    turn: Mutex<()>,
    next_pool: AtomicU64,
    /// Set once rank 0 has told the others to stop: nothing is sent after, and forward calls fail.
    stopped: AtomicBool,
    /// Collectives run so far: calls, nanoseconds in them, bytes this rank contributed.
    calls: AtomicU64,
    nanos: AtomicU64,
    bytes: AtomicU64,
}

/// The collectives a sharded model's forward calls ran on one rank so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CollectiveStats {
    pub calls: u64,
    /// Time spent in them (waiting for the other ranks included).
    pub seconds: f64,
    /// Bytes this rank contributed.
    pub bytes: u64,
}

impl std::ops::Sub for CollectiveStats {
    type Output = CollectiveStats;
    fn sub(self, earlier: CollectiveStats) -> CollectiveStats {
        CollectiveStats {
            calls: self.calls - earlier.calls,
            seconds: self.seconds - earlier.seconds,
            bytes: self.bytes - earlier.bytes,
        }
    }
}

impl Link {
    pub(crate) fn new(transport: Arc<dyn Transport>) -> Link {
        Link {
            transport,
            turn: Mutex::new(()),
            next_pool: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    fn stats(&self) -> CollectiveStats {
        CollectiveStats {
            calls: self.calls.load(Ordering::Relaxed),
            seconds: self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn rank(&self) -> usize {
        self.transport.rank()
    }

    pub(crate) fn ranks(&self) -> usize {
        self.transport.ranks()
    }

    /// Rank 0's turn on the transport.
    pub(crate) fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `msg` from rank 0 to the others (the caller holds the turn); nothing once they have stopped.
    pub(crate) fn send(&self, msg: &Msg) {
        if self.stopped() {
            return;
        }
        let mut bytes = msg.encode();
        self.transport.broadcast(&mut bytes);
    }

    /// Whether rank 0 has told the others to stop.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Tells the other ranks to stop following (once; rank 0 only).
    fn stop(&self) {
        if self.rank() != 0 {
            return;
        }
        let _turn = self.turn();
        self.send(&Msg::Stop);
        self.stopped.store(true, Ordering::Release);
    }

    fn receive(&self) -> Result<Msg, RuntimeError> {
        let mut bytes = Vec::new();
        self.transport.broadcast(&mut bytes);
        Msg::decode(&bytes)
    }

    /// KV memory on rank 0 whose every change the other ranks make to theirs.
    pub(crate) fn mirrored_kv(self: &Arc<Self>, kv: &q3c_abi::KvGeometry) -> MirroredKv {
        let id = self.next_pool.fetch_add(1, Ordering::Relaxed);
        let _turn = self.turn();
        self.send(&Msg::NewPool { id });
        MirroredKv {
            inner: HostKv::new(kv),
            id,
            link: self.clone(),
        }
    }

    /// The `collective_ctx` of `q3c_services` for [`collective`].
    pub(crate) fn as_ctx(&self) -> *mut std::ffi::c_void {
        self as *const Link as *mut _
    }
}

impl Drop for CompiledModel {
    fn drop(&mut self) {
        // Rank 0's model is gone (its sessions, which borrow it, before it): the others stop following.
        self.release_followers();
    }
}

/// `q3c_services.collective`: runs a collective of the artifact's forward call over the link at `ctx`.
///
/// # Safety
/// `ctx` is a [`Link`] outliving the call (or null for a model that is not sharded, which has no
/// collectives); `args` is a collective's argument block `[T, step, x, out]` with `n` floats of x and room
/// for the result in out, as `q3c_abi.h` describes.
pub(crate) unsafe extern "C" fn collective(
    ctx: *mut std::ffi::c_void,
    op: u64,
    args: *const u64,
    n: u64,
) {
    let (Some(link), Some(op)) = ((ctx as *const Link).as_ref(), Collective::from_word(op)) else {
        // An artifact's own contract broken: nothing sensible can go on.
        eprintln!("error: q3c artifact asked for collective {op:#x} without a sharded runtime");
        std::process::abort();
    };
    let start = std::time::Instant::now();
    let t = *args as usize;
    let x = std::slice::from_raw_parts(*args.add(2) as *const f32, n as usize);
    let out = *args.add(3) as *mut f32;
    let (rank, ranks) = (link.rank(), link.ranks());
    match op {
        Collective::AllReduce { .. } => {
            let out = std::slice::from_raw_parts_mut(out, n as usize);
            if op.contributes(rank, ranks) {
                link.transport.all_reduce(x, out);
            } else {
                link.transport.all_reduce(&vec![0.0; x.len()], out);
            }
        }
        Collective::AllGather => {
            let mut all = vec![0f32; x.len() * ranks];
            link.transport.all_gather(x, &mut all);
            // Row i of the result is every rank's row i side by side.
            let width = x.len() / t.max(1);
            let out = std::slice::from_raw_parts_mut(out, all.len());
            for (r, part) in all.chunks(x.len()).enumerate() {
                for (i, row) in part.chunks(width).enumerate() {
                    let at = i * width * ranks + r * width;
                    out[at..at + width].copy_from_slice(row);
                }
            }
        }
    }
    link.calls.fetch_add(1, Ordering::Relaxed);
    link.bytes.fetch_add(4 * n, Ordering::Relaxed);
    link.nanos
        .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// What rank 0 tells the others.
#[derive(Debug, PartialEq)]
pub(crate) enum Msg {
    NewPool { id: u64 },
    Resize { id: u64, bytes: u64 },
    Copy { id: u64, from: u64, to: u64, n: u64 },
    DropPool { id: u64 },
    Forward(ForwardMsg),
    Stop,
}

/// One forward call, as the other ranks replay it.
#[derive(Debug, PartialEq)]
pub(crate) struct ForwardMsg {
    pub pool: u64,
    pub ids: Vec<i32>,
    pub pos: Vec<u32>,
    pub seq: Vec<u32>,
    /// Each sequence's row after its last, and its block table (the blocks its rows reach).
    pub seqs: Vec<(u64, Vec<u32>)>,
    /// The rows whose logits are asked for (`None`: every row).
    pub listed: Option<Vec<u32>>,
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        let mut w: Vec<u64> = Vec::new();
        let list = |w: &mut Vec<u64>, xs: &mut dyn Iterator<Item = u64>| {
            let at = w.len();
            w.push(0);
            w.extend(xs);
            w[at] = (w.len() - at - 1) as u64;
        };
        match self {
            Msg::NewPool { id } => w.extend([0, *id]),
            Msg::Resize { id, bytes } => w.extend([1, *id, *bytes]),
            Msg::Copy { id, from, to, n } => w.extend([2, *id, *from, *to, *n]),
            Msg::DropPool { id } => w.extend([3, *id]),
            Msg::Forward(f) => {
                w.extend([4, f.pool]);
                list(&mut w, &mut f.ids.iter().map(|&i| i as u32 as u64));
                list(&mut w, &mut f.pos.iter().map(|&p| u64::from(p)));
                list(&mut w, &mut f.seq.iter().map(|&s| u64::from(s)));
                w.push(f.seqs.len() as u64);
                for (end, blocks) in &f.seqs {
                    w.push(*end);
                    list(&mut w, &mut blocks.iter().map(|&b| u64::from(b)));
                }
                match &f.listed {
                    None => w.push(0),
                    Some(rows) => {
                        w.push(1);
                        list(&mut w, &mut rows.iter().map(|&r| u64::from(r)));
                    }
                }
            }
            Msg::Stop => w.push(5),
        }
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn decode(bytes: &[u8]) -> Result<Msg, RuntimeError> {
        let bad = || RuntimeError::Internal("a malformed message from rank 0".into());
        if !bytes.len().is_multiple_of(8) {
            return Err(bad());
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut r = words.iter().copied();
        let mut next = || r.next().ok_or_else(bad);
        let msg = match next()? {
            0 => Msg::NewPool { id: next()? },
            1 => Msg::Resize {
                id: next()?,
                bytes: next()?,
            },
            2 => Msg::Copy {
                id: next()?,
                from: next()?,
                to: next()?,
                n: next()?,
            },
            3 => Msg::DropPool { id: next()? },
            4 => {
                let pool = next()?;
                let mut list = || -> Result<Vec<u64>, RuntimeError> {
                    let n = next()?;
                    (0..n).map(|_| next()).collect()
                };
                let ids = list()?.into_iter().map(|v| v as u32 as i32).collect();
                let pos = list()?.into_iter().map(|v| v as u32).collect();
                let seq = list()?.into_iter().map(|v| v as u32).collect();
                let n_seqs = next()?;
                let mut seqs = Vec::new();
                for _ in 0..n_seqs {
                    let end = next()?;
                    let n = next()?;
                    let blocks = (0..n)
                        .map(|_| next().map(|b| b as u32))
                        .collect::<Result<_, _>>()?;
                    seqs.push((end, blocks));
                }
                let listed = match next()? {
                    0 => None,
                    _ => {
                        let n = next()?;
                        Some(
                            (0..n)
                                .map(|_| next().map(|b| b as u32))
                                .collect::<Result<_, _>>()?,
                        )
                    }
                };
                Msg::Forward(ForwardMsg {
                    pool,
                    ids,
                    pos,
                    seq,
                    seqs,
                    listed,
                })
            }
            5 => Msg::Stop,
            _ => return Err(bad()),
        };
        Ok(msg)
    }
}

/// Rank 0's KV memory: host buffers whose every change is sent to the other ranks first.
pub(crate) struct MirroredKv {
    inner: HostKv,
    id: u64,
    link: Arc<Link>,
}

impl KvMemory for MirroredKv {
    fn resize(&mut self, bytes: usize) -> bool {
        let _turn = self.link.turn();
        self.link.send(&Msg::Resize {
            id: self.id,
            bytes: bytes as u64,
        });
        self.inner.resize(bytes)
    }

    fn copy_within(&mut self, from: usize, to: usize, n: usize) -> bool {
        let _turn = self.link.turn();
        self.link.send(&Msg::Copy {
            id: self.id,
            from: from as u64,
            to: to as u64,
            n: n as u64,
        });
        self.inner.copy_within(from, to, n)
    }

    fn pointers(&mut self) -> Vec<*mut f32> {
        self.inner.pointers()
    }

    fn resident_bytes(&self) -> usize {
        self.inner.resident_bytes()
    }

    fn mirror(&self) -> Option<u64> {
        Some(self.id)
    }
}

impl Drop for MirroredKv {
    fn drop(&mut self) {
        let _turn = self.link.turn();
        self.link.send(&Msg::DropPool { id: self.id });
    }
}

impl CompiledModel {
    /// On rank 0 of a sharded model: tells the other ranks to stop following, after any forward call under
    /// way (then every forward call fails). Dropping the model does it too; a model that is never dropped
    /// (a server's) must call it before the job ends. Nothing elsewhere.
    pub fn release_followers(&self) {
        if let Some(link) = &self.link {
            link.stop();
        }
    }

    /// The collectives this rank's forward calls ran so far (`None` for a model that is not sharded).
    pub fn collective_stats(&self) -> Option<CollectiveStats> {
        self.link.as_ref().map(|l| l.stats())
    }

    /// On a rank other than 0 of a sharded model: replays what rank 0 sends — every KV pool change and
    /// forward call — on this rank's slice, until rank 0's model is dropped. An error (a malformed message,
    /// memory that cannot be had) means this rank cannot keep step; the caller must end the job.
    pub fn follow(&self) -> Result<(), RuntimeError> {
        let link = match &self.link {
            Some(link) if link.rank() != 0 => link,
            _ => {
                return Err(RuntimeError::Input(
                    "only a rank other than 0 of a sharded model follows".into(),
                ))
            }
        };
        let mut pools: HashMap<u64, HostKv> = HashMap::new();
        let mut scratch = super::sequences::Scratch::new(self);
        let missing =
            |id| RuntimeError::Internal(format!("rank 0 names KV pool {id}, unknown here"));
        loop {
            match link.receive()? {
                Msg::NewPool { id } => {
                    pools.insert(id, HostKv::new(&self.manifest.kv));
                }
                Msg::Resize { id, bytes } => {
                    let pool = pools.get_mut(&id).ok_or_else(|| missing(id))?;
                    if !pool.resize(bytes as usize) {
                        return Err(RuntimeError::Internal(format!(
                            "cannot grow a KV pool to {bytes} bytes"
                        )));
                    }
                }
                Msg::Copy { id, from, to, n } => {
                    let pool = pools.get_mut(&id).ok_or_else(|| missing(id))?;
                    pool.copy_within(from as usize, to as usize, n as usize);
                }
                Msg::DropPool { id } => {
                    pools.remove(&id);
                }
                Msg::Forward(f) => {
                    let pool = pools.get_mut(&f.pool).ok_or_else(|| missing(f.pool))?;
                    super::sequences::replay(self, pool, &mut scratch, &f)?;
                }
                Msg::Stop => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let msgs = [
            Msg::NewPool { id: 3 },
            Msg::Resize {
                id: 3,
                bytes: 1 << 40,
            },
            Msg::Copy {
                id: 1,
                from: 2,
                to: 3,
                n: 4,
            },
            Msg::DropPool { id: 9 },
            Msg::Forward(ForwardMsg {
                pool: 2,
                ids: vec![5, 151_935, 0],
                pos: vec![7, 8, 0],
                seq: vec![0, 0, 1],
                seqs: vec![(2, vec![0]), (3, vec![4, 1])],
                listed: Some(vec![1, 2]),
            }),
            Msg::Forward(ForwardMsg {
                pool: 0,
                ids: vec![1],
                pos: vec![0],
                seq: vec![0],
                seqs: vec![(1, vec![0])],
                listed: None,
            }),
            Msg::Stop,
        ];
        for m in msgs {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
        assert!(Msg::decode(&[1, 2, 3]).is_err());
        assert!(Msg::decode(&4u64.to_le_bytes()).is_err());
    }

    #[test]
    fn thread_ranks_reduce_gather_and_broadcast() {
        let world = ThreadTransport::world(3);
        std::thread::scope(|s| {
            for t in &world {
                s.spawn(move || {
                    let r = t.rank() as f32;
                    let mut sum = [0f32; 2];
                    t.all_reduce(&[r, 1.0], &mut sum);
                    assert_eq!(sum, [3.0, 3.0]);
                    let mut all = [0f32; 6];
                    t.all_gather(&[r, -r], &mut all);
                    assert_eq!(all, [0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
                    let mut b = if t.rank() == 0 { vec![7, 8] } else { vec![1] };
                    t.broadcast(&mut b);
                    assert_eq!(b, [7, 8]);
                    assert_eq!(t.ranks(), 3);
                });
            }
        });
    }
}
