//! [`Batch`]: several sequences on one model, fed together. A compiled model runs each feed as calls
//! whose rows are every sequence's new tokens ([`crate::CompiledBatch`]: the weights are read once per
//! call for all of them); any executor's sessions can stand behind the same interface
//! ([`SessionBatch`], one forward per sequence), so schedulers are written once.

use std::collections::HashMap;

use crate::error::RuntimeError;
use crate::session::Session;

/// A sequence of a [`Batch`].
pub type SeqId = u64;

/// Sequences decoded together on one model, each with its own tokens in a shared KV cache.
pub trait Batch {
    /// A new, empty sequence.
    fn open(&mut self) -> SeqId;

    /// Forgets a sequence and frees its cache.
    fn close(&mut self, seq: SeqId);

    /// A new sequence holding the first `len` tokens of `from` (at most those it holds), as if it had been
    /// fed them: the cache of those tokens is shared where the executor can, not recomputed.
    fn fork(&mut self, from: SeqId, len: usize) -> Result<SeqId, RuntimeError>;

    /// Tokens sequence `seq` holds (0 for one that is not open).
    fn position(&self, seq: SeqId) -> usize;

    /// Keeps the first `len` tokens of sequence `seq` (see [`Session::truncate`]).
    fn truncate(&mut self, seq: SeqId, len: usize);

    /// Tokens the shared cache may hold, all sequences together.
    fn capacity(&self) -> usize;

    /// Tokens of cache the sequences hold now (whole blocks where the cache is paged; a block shared by
    /// forks counts once).
    fn in_use(&self) -> usize;

    /// Feeds each listed sequence (each at most once) its ids after what it holds, all in one pass, and
    /// returns the logits after each one's last id, in the order given. On error every sequence is left
    /// as it was.
    fn forward_last(&mut self, work: &[(SeqId, &[u32])]) -> Result<Vec<Vec<f32>>, RuntimeError>;

    /// Rows of the embedding table (ids must be below this).
    fn vocab_size(&self) -> usize;
}

/// The error for a sequence that is not open in a batch.
pub(crate) fn no_sequence(seq: SeqId) -> RuntimeError {
    RuntimeError::Input(format!("no sequence {seq} in this batch"))
}

/// The error for a feed of `new` tokens that the batch's cache (`capacity` tokens, `free` of them free)
/// cannot hold.
pub(crate) fn cache_full(new: usize, capacity: usize, free: usize) -> RuntimeError {
    RuntimeError::Input(format!(
        "KV cache full: {new} new tokens do not fit in the batch's {capacity} tokens ({free} free)"
    ))
}

/// Checks that every sequence `work` feeds is open (`is_open`) and fed once.
pub(crate) fn check_work(
    work: &[(SeqId, &[u32])],
    is_open: impl Fn(SeqId) -> bool,
) -> Result<(), RuntimeError> {
    for (i, (seq, _)) in work.iter().enumerate() {
        if !is_open(*seq) {
            return Err(no_sequence(*seq));
        }
        if work[..i].iter().any(|(other, _)| other == seq) {
            return Err(RuntimeError::Input(format!(
                "sequence {seq} is fed twice in one call"
            )));
        }
    }
    Ok(())
}

/// A [`Batch`] of independent sessions, each fed in turn (for executors without batched calls: the
/// reference executor). A fork is a new session fed the tokens again.
pub struct SessionBatch<'m> {
    open: Box<dyn Fn() -> Box<dyn Session + Send + 'm> + Send + 'm>,
    /// Each sequence's session and the tokens it holds.
    sessions: HashMap<SeqId, (Box<dyn Session + Send + 'm>, Vec<u32>)>,
    next: SeqId,
    capacity: usize,
    vocab: usize,
}

impl<'m> SessionBatch<'m> {
    /// Sequences made by `open`, up to `capacity` tokens in all (each session its own cache).
    pub fn new(
        open: Box<dyn Fn() -> Box<dyn Session + Send + 'm> + Send + 'm>,
        capacity: usize,
    ) -> Self {
        let vocab = open().vocab_size();
        SessionBatch {
            open,
            sessions: HashMap::new(),
            next: 0,
            capacity,
            vocab,
        }
    }
}

impl Batch for SessionBatch<'_> {
    fn open(&mut self) -> SeqId {
        let id = self.next;
        self.next += 1;
        self.sessions.insert(id, ((self.open)(), Vec::new()));
        id
    }

    fn close(&mut self, seq: SeqId) {
        self.sessions.remove(&seq);
    }

    fn fork(&mut self, from: SeqId, len: usize) -> Result<SeqId, RuntimeError> {
        let tokens = match self.sessions.get(&from) {
            Some((_, tokens)) => tokens[..len.min(tokens.len())].to_vec(),
            None => return Err(no_sequence(from)),
        };
        let id = self.open();
        if !tokens.is_empty() {
            if let Err(e) = self.forward_last(&[(id, &tokens)]) {
                self.close(id);
                return Err(e);
            }
        }
        Ok(id)
    }

    fn position(&self, seq: SeqId) -> usize {
        self.sessions.get(&seq).map_or(0, |(s, _)| s.position())
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some((s, tokens)) = self.sessions.get_mut(&seq) {
            s.truncate(len);
            tokens.truncate(s.position());
        }
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_use(&self) -> usize {
        self.sessions.values().map(|(s, _)| s.position()).sum()
    }

    fn forward_last(&mut self, work: &[(SeqId, &[u32])]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let held = self.in_use();
        let new: usize = work.iter().map(|(_, ids)| ids.len()).sum();
        if held + new > self.capacity {
            let free = self.capacity.saturating_sub(held);
            return Err(cache_full(new, self.capacity, free));
        }
        check_work(work, |seq| self.sessions.contains_key(&seq))?;
        let mut out = Vec::with_capacity(work.len());
        for (i, (seq, ids)) in work.iter().enumerate() {
            let (session, tokens) = self.sessions.get_mut(seq).expect("checked");
            match session.forward_last(ids) {
                Ok(row) => {
                    tokens.extend_from_slice(ids);
                    out.push(row);
                }
                Err(e) => {
                    // Undo the sequences already fed.
                    for (seq, ids) in &work[..i] {
                        let (s, tokens) = self.sessions.get_mut(seq).expect("checked");
                        s.truncate(s.position() - ids.len());
                        tokens.truncate(s.position());
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
