//! Forward calls over the sequences of a compiled model: [`CompiledSession`] (one sequence with its own
//! cache, the [`Session`] interface) and [`CompiledBatch`] (many sequences in one shared pool, fed
//! together so that each call reads the weights once for all of them).

use std::collections::HashMap;

use q3c_abi::{Seq, Services, Step, KV_BLOCK_TOKENS};

use super::kv::{HostKv, KvMemory, KvPool, SeqBlocks};
use super::ranks::{self, ForwardMsg, Msg};
use super::{pool, CompiledModel, Entry, ThreadPool, DEFAULT_CONTEXT};
use crate::batch::{cache_full, check_work, no_sequence, Batch, SeqId};
use crate::error::RuntimeError;
use crate::session::{Logits, Session};

/// Which rows' logits a run returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Every row's (a run of one sequence).
    All,
    /// The last row of each sequence.
    LastOfEach,
}

/// A model's scratch arena for one call at a time.
pub(super) struct Scratch(Vec<u8>);

impl Scratch {
    pub(super) fn new(model: &CompiledModel) -> Scratch {
        Scratch(vec![0u8; model.host_scratch_bytes() + 64])
    }

    /// The 64-aligned start.
    fn ptr(&mut self) -> *mut u8 {
        let base = self.0.as_mut_ptr();
        // SAFETY: the buffer has 64 bytes of slack for the alignment.
        unsafe { base.add(base.align_offset(64)) }
    }
}

/// One row of a call: which sequence of the work, and which of its ids.
#[derive(Clone, Copy)]
struct Row {
    work: usize,
    index: usize,
}

/// Feeds each sequence of `work` its ids after what it holds, in calls of at most `max_tokens_per_call`
/// rows (a sequence's ids may span calls; a call may hold several sequences). Writes into `out` one logits
/// row per id (`Want::All`) or per sequence (`Want::LastOfEach`). The blocks must be reserved already; on
/// error every sequence keeps the length it had.
fn run(
    model: &CompiledModel,
    pool: &mut KvPool,
    scratch: &mut Scratch,
    work: &mut [(&mut SeqBlocks, &[u32])],
    want: Want,
    out: &mut [f32],
) -> Result<(), RuntimeError> {
    let vocab = model.manifest.vocab_size;
    let chunk = model.manifest.max_tokens_per_call;
    let rows: Vec<Row> = work
        .iter()
        .enumerate()
        .flat_map(|(w, (_, ids))| (0..ids.len()).map(move |index| Row { work: w, index }))
        .collect();
    if let Some(link) = model.link.as_ref().filter(|l| l.rank() != 0) {
        // Its collectives would wait for ranks that only answer rank 0.
        return Err(RuntimeError::Input(format!(
            "rank {} of a sharded model runs only what rank 0 sends (CompiledModel::follow)",
            link.rank()
        )));
    }
    let threads = model.threads()?;
    let services = services(model, &threads);
    let mirror = pool.mirror();
    let mut kv = pool.pointers();
    let mut done = 0;
    let mut last_rows = Vec::new();
    for call in rows.chunks(chunk) {
        let ids: Vec<i32> = call
            .iter()
            .map(|r| work[r.work].1[r.index] as i32)
            .collect();
        let pos: Vec<u32> = call
            .iter()
            .map(|r| (work[r.work].0.len + r.index) as u32)
            .collect();
        // The call's sequences in order of appearance, each with the row after its last; the rows ending
        // a sequence's ids.
        let mut seqs: Vec<Seq> = Vec::new();
        let mut seq: Vec<u32> = Vec::with_capacity(call.len());
        let mut ends: Vec<u32> = Vec::new();
        for (i, r) in call.iter().enumerate() {
            if i == 0 || call[i - 1].work != r.work {
                seqs.push(Seq {
                    blocks: work[r.work].0.blocks.as_ptr(),
                    end: 0,
                });
            }
            seqs.last_mut().expect("pushed").end = i as u64 + 1;
            seq.push(seqs.len() as u32 - 1);
            if r.index + 1 == work[r.work].1.len() {
                ends.push(i as u32);
            }
        }
        let call_rows = CallRows {
            ids: &ids,
            pos: &pos,
            seq: &seq,
            seqs: &seqs,
            kv: &mut kv,
            mirror,
        };
        match want {
            Want::All => {
                let logits = &mut out[done * vocab..(done + call.len()) * vocab];
                forward_call(model, scratch, &services, call_rows, None, logits)?;
            }
            Want::LastOfEach => {
                // A call ending no sequence still computes one row (the ABI asks for at least one).
                let listed = if ends.is_empty() {
                    vec![call.len() as u32 - 1]
                } else {
                    ends.clone()
                };
                let mut logits = vec![0f32; listed.len() * vocab];
                forward_call(
                    model,
                    scratch,
                    &services,
                    call_rows,
                    Some(&listed),
                    &mut logits,
                )?;
                if !ends.is_empty() {
                    last_rows.push(logits);
                }
            }
        }
        done += call.len();
    }
    if want == Want::LastOfEach {
        // Sequences end in work order, one row each.
        for (w, row) in last_rows.iter().flat_map(|l| l.chunks(vocab)).enumerate() {
            out[w * vocab..(w + 1) * vocab].copy_from_slice(row);
        }
    }
    // Every call succeeded: the sequences hold their new tokens.
    for (blocks, ids) in work.iter_mut() {
        blocks.len += ids.len();
    }
    Ok(())
}

/// The rows of one call, as the step lists them.
struct CallRows<'a> {
    ids: &'a [i32],
    pos: &'a [u32],
    seq: &'a [u32],
    seqs: &'a [Seq],
    kv: &'a mut [*mut f32],
    /// The id of their KV pool on the other ranks, where this is rank 0 of a sharded model.
    mirror: Option<u64>,
}

/// The services a forward call of `model` gets, on its thread pool.
fn services(model: &CompiledModel, threads: &ThreadPool) -> Services {
    Services {
        parallel_for: pool::parallel_for,
        pool: threads as *const ThreadPool as *mut _,
        collective: ranks::collective,
        collective_ctx: model
            .link
            .as_ref()
            .map_or(std::ptr::null_mut(), |l| l.as_ctx()),
    }
}

/// Runs on this rank the forward call rank 0 sent, over `pool`'s blocks (the logits are rank 0's).
pub(super) fn replay(
    model: &CompiledModel,
    pool: &mut HostKv,
    scratch: &mut Scratch,
    call: &ForwardMsg,
) -> Result<(), RuntimeError> {
    let threads = model.threads()?;
    let services = services(model, &threads);
    let mut kv = pool.pointers();
    let seqs: Vec<Seq> = call
        .seqs
        .iter()
        .map(|(end, blocks)| Seq {
            blocks: blocks.as_ptr(),
            end: *end,
        })
        .collect();
    let rows = call.listed.as_ref().map_or(call.ids.len(), Vec::len);
    let mut logits = vec![0f32; rows * model.manifest.vocab_size];
    let call_rows = CallRows {
        ids: &call.ids,
        pos: &call.pos,
        seq: &call.seq,
        seqs: &seqs,
        kv: &mut kv,
        mirror: None,
    };
    forward_call(
        model,
        scratch,
        &services,
        call_rows,
        call.listed.as_deref(),
        &mut logits,
    )
}

/// One forward call over `rows`, writing the logits of the `listed` rows (or of every row) into `logits`.
fn forward_call(
    model: &CompiledModel,
    scratch: &mut Scratch,
    services: &Services,
    rows: CallRows<'_>,
    listed: Option<&[u32]>,
    logits: &mut [f32],
) -> Result<(), RuntimeError> {
    // Rank 0 of a sharded model: the other ranks run the same call, meeting it in its collectives.
    let _turn = match (&model.link, rows.mirror) {
        (Some(link), Some(pool)) => {
            let turn = link.turn();
            if link.stopped() {
                return Err(RuntimeError::Internal(
                    "the other ranks of this sharded model have stopped".into(),
                ));
            }
            let seqs = rows
                .seqs
                .iter()
                .map(|s| {
                    // A sequence's last row has its highest position.
                    let last = rows.pos[s.end as usize - 1] as usize;
                    // SAFETY: the block table covers every position its rows reach.
                    let blocks =
                        unsafe { std::slice::from_raw_parts(s.blocks, last / KV_BLOCK_TOKENS + 1) };
                    (s.end, blocks.to_vec())
                })
                .collect();
            link.send(&Msg::Forward(ForwardMsg {
                pool,
                ids: rows.ids.to_vec(),
                pos: rows.pos.to_vec(),
                seq: rows.seq.to_vec(),
                seqs,
                listed: listed.map(<[u32]>::to_vec),
            }));
            Some(turn)
        }
        _ => None,
    };
    let step = Step {
        ids: rows.ids.as_ptr(),
        t: rows.ids.len() as u64,
        pos: rows.pos.as_ptr(),
        seq: rows.seq.as_ptr(),
        seqs: rows.seqs.as_ptr(),
        n_seqs: rows.seqs.len() as u64,
        weights: model.weight_ptrs.as_ptr(),
        kv: rows.kv.as_ptr(),
        scratch: scratch.ptr(),
        logits: logits.as_mut_ptr(),
        services,
        logit_rows: listed.map_or(std::ptr::null(), |l| l.as_ptr()),
        n_logits: listed.map_or(0, |l| l.len() as u64),
        rank: model.rank() as u64,
    };
    // SAFETY: every pointer in `step` is valid for the sizes the manifest specifies: weights were checked
    // against it; every sequence's block table covers the positions its rows reach (reserved by the
    // caller) within the pool whose buffers `kv` lists; scratch and logits are sized from the manifest and
    // the rows asked for.
    let status = match &model.entry {
        Entry::Forward(forward) => unsafe { forward(&step) },
        Entry::Launched(launcher) => unsafe { launcher.run(&step) },
        #[cfg(feature = "cuda")]
        Entry::Cuda(gpu) => unsafe { gpu.run(&step)? },
    };
    match status {
        q3c_abi::OK => Ok(()),
        q3c_abi::ERR_TOKEN_ID => Err(RuntimeError::Input(format!(
            "a token id is outside the vocabulary (0..{})",
            model.manifest.vocab_size
        ))),
        q3c_abi::ERR_TOKENS => Err(RuntimeError::Internal(format!(
            "artifact refused a call of {} tokens",
            rows.ids.len()
        ))),
        other => Err(RuntimeError::Internal(format!(
            "artifact returned status {other}"
        ))),
    }
}

/// Checks the ids of one sequence's feed.
fn check_ids(model: &CompiledModel, ids: &[u32]) -> Result<(), RuntimeError> {
    let vocab = model.manifest.vocab_size;
    if ids.is_empty() {
        return Err(RuntimeError::Input("no token ids to run".into()));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(RuntimeError::Input(format!(
            "token id {bad} is outside the vocabulary (0..{vocab})"
        )));
    }
    Ok(())
}

impl CompiledModel {
    /// A session whose KV cache holds up to `capacity` tokens. The cache grows as tokens arrive (doubling
    /// from 256), so a generous capacity costs memory only when used.
    pub fn session_with_capacity(&self, capacity: usize) -> CompiledSession<'_> {
        CompiledSession {
            model: self,
            pool: KvPool::new(&self.manifest.kv, capacity, self.kv_memory()),
            seq: SeqBlocks::default(),
            capacity,
            scratch: Scratch::new(self),
        }
    }

    /// A session with the default capacity (4096 tokens, or the model's maximum if smaller).
    pub fn session(&self) -> CompiledSession<'_> {
        self.session_with_capacity(DEFAULT_CONTEXT.min(self.config.max_position_embeddings))
    }

    /// Sequences sharing one KV cache of up to `tokens` tokens in all (see [`CompiledBatch`]).
    pub fn batch(&self, tokens: usize) -> CompiledBatch<'_> {
        CompiledBatch {
            model: self,
            pool: KvPool::new(&self.manifest.kv, tokens, self.kv_memory()),
            seqs: HashMap::new(),
            next: 0,
            scratch: Scratch::new(self),
        }
    }
}

/// One sequence on a compiled model: its own KV cache and scratch memory.
pub struct CompiledSession<'m> {
    model: &'m CompiledModel,
    pool: KvPool,
    seq: SeqBlocks,
    /// Tokens the session may hold.
    capacity: usize,
    scratch: Scratch,
}

impl CompiledSession<'_> {
    /// Checks ids and capacity, then runs them, writing logits into `out` (one row per id, or the last
    /// id's only).
    fn run(&mut self, ids: &[u32], want: Want, out: &mut [f32]) -> Result<(), RuntimeError> {
        check_ids(self.model, ids)?;
        let held = self.seq.len;
        if held + ids.len() > self.capacity || !self.seq.reserve(&mut self.pool, held + ids.len()) {
            return Err(RuntimeError::Input(format!(
                "context full: {held} cached + {} new tokens exceed the session's capacity of {}",
                ids.len(),
                self.capacity
            )));
        }
        let mut work = [(&mut self.seq, ids)];
        run(
            self.model,
            &mut self.pool,
            &mut self.scratch,
            &mut work,
            want,
            out,
        )
    }
}

impl Session for CompiledSession<'_> {
    fn forward(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        let vocab = self.model.manifest.vocab_size;
        let mut data = vec![0f32; ids.len() * vocab];
        self.run(ids, Want::All, &mut data)?;
        Ok(Logits {
            rows: ids.len(),
            vocab,
            data,
        })
    }

    fn forward_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let mut row = vec![0f32; self.model.manifest.vocab_size];
        self.run(ids, Want::LastOfEach, &mut row)?;
        Ok(row)
    }

    fn position(&self) -> usize {
        self.seq.len
    }

    fn reset(&mut self) {
        self.seq.truncate(&mut self.pool, 0);
    }

    fn truncate(&mut self, len: usize) {
        self.seq.truncate(&mut self.pool, len);
    }

    fn vocab_size(&self) -> usize {
        self.model.manifest.vocab_size
    }
}

/// Many sequences on a compiled model, in one KV-cache pool: [`Batch::forward_last`] feeds all of them in
/// calls whose rows are every sequence's new tokens, so the matrix products read each weight once per
/// call for all of them, and attention reads each row's own sequence through its block table.
pub struct CompiledBatch<'m> {
    model: &'m CompiledModel,
    pool: KvPool,
    seqs: HashMap<SeqId, SeqBlocks>,
    next: SeqId,
    scratch: Scratch,
}

impl CompiledBatch<'_> {
    /// Bytes of KV-cache memory held now.
    pub fn kv_resident_bytes(&self) -> usize {
        self.pool.resident_bytes()
    }
}

impl Batch for CompiledBatch<'_> {
    fn open(&mut self) -> SeqId {
        let id = self.next;
        self.next += 1;
        self.seqs.insert(id, SeqBlocks::default());
        id
    }

    fn close(&mut self, id: SeqId) {
        if let Some(mut seq) = self.seqs.remove(&id) {
            seq.truncate(&mut self.pool, 0);
        }
    }

    fn fork(&mut self, from: SeqId, len: usize) -> Result<SeqId, RuntimeError> {
        let forked = self
            .seqs
            .get(&from)
            .ok_or_else(|| no_sequence(from))?
            .fork(&mut self.pool, len)
            .ok_or_else(|| {
                RuntimeError::Input(format!(
                    "KV cache full: no free block for a fork of sequence {from} (the batch holds {} tokens)",
                    self.pool.capacity()
                ))
            })?;
        let id = self.open();
        self.seqs.insert(id, forked);
        Ok(id)
    }

    fn position(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.len)
    }

    fn truncate(&mut self, id: SeqId, len: usize) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.truncate(&mut self.pool, len);
        }
    }

    fn capacity(&self) -> usize {
        self.pool.capacity()
    }

    fn in_use(&self) -> usize {
        self.pool.capacity() - self.pool.free_tokens()
    }

    fn forward_last(&mut self, work: &[(SeqId, &[u32])]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let vocab = self.model.manifest.vocab_size;
        for (_, ids) in work {
            check_ids(self.model, ids)?;
        }
        check_work(work, |seq| self.seqs.contains_key(&seq))?;
        // Reserve every sequence's blocks first; if the pool cannot hold them, give back what was taken.
        let held: Vec<usize> = work.iter().map(|(id, _)| self.seqs[id].len).collect();
        for (i, (id, ids)) in work.iter().enumerate() {
            let seq = self.seqs.get_mut(id).expect("checked");
            if !seq.reserve(&mut self.pool, held[i] + ids.len()) {
                for (k, (id, _)) in work[..=i].iter().enumerate() {
                    let seq = self.seqs.get_mut(id).expect("checked");
                    seq.truncate(&mut self.pool, held[k]);
                }
                let new = work.iter().map(|(_, ids)| ids.len()).sum();
                return Err(cache_full(
                    new,
                    self.pool.capacity(),
                    self.pool.free_tokens(),
                ));
            }
        }
        // Take the sequences out of the map to borrow them together, in work order.
        let mut taken: Vec<SeqBlocks> = work
            .iter()
            .map(|(id, _)| self.seqs.remove(id).expect("checked"))
            .collect();
        let mut out = vec![0f32; work.len() * vocab];
        let result = {
            let mut feed: Vec<(&mut SeqBlocks, &[u32])> = taken
                .iter_mut()
                .zip(work)
                .map(|(s, (_, ids))| (s, *ids))
                .collect();
            run(
                self.model,
                &mut self.pool,
                &mut self.scratch,
                &mut feed,
                Want::LastOfEach,
                &mut out,
            )
        };
        for ((id, _), mut seq) in work.iter().zip(taken.drain(..)) {
            if result.is_err() {
                // Blocks reserved for the failed call go back; the held positions stay.
                let len = seq.len;
                seq.truncate(&mut self.pool, len);
            }
            self.seqs.insert(*id, seq);
        }
        result?;
        Ok(out.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    fn vocab_size(&self) -> usize {
        self.model.manifest.vocab_size
    }
}
