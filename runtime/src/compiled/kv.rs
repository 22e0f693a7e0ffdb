//! The KV cache of compiled artifacts: per layer, K and V pools of blocks of
//! [`KV_BLOCK_TOKENS`] rows, and each sequence's block table (ABI 4, `q3c_abi.h`).
//!
//! A pool grows by doubling (from [`INITIAL_BLOCKS`]) up to its limit, so a generous limit costs memory
//! only when used; growing moves the buffers but not the blocks' numbers, so block tables stay valid.
//! Sequences take free blocks as they grow and give them back when cut or closed, so several sequences
//! share one pool without reserving their whole context each.
//!
//! A sequence can start as a copy of another's first tokens ([`SeqBlocks::fork`]): the full blocks are
//! shared (counted references; a full block is never written again, as positions only grow), and a partial
//! last block is copied, so that a sequence only ever writes into a block it holds alone.
//!
//! The buffers live where the artifact's kernels read them ([`KvMemory`]): in host memory, or in a GPU's.

use q3c_abi::{KvGeometry, KV_BLOCK_TOKENS};

/// The buffers of a pool (one per layer's K and V), in the memory the kernels read.
pub(crate) trait KvMemory: Send {
    /// Makes every buffer `bytes` long, keeping what its first bytes held and zeroing the rest; `false`
    /// (buffers unchanged) if the memory cannot be had.
    fn resize(&mut self, bytes: usize) -> bool;
    /// Copies `n` bytes at byte `from` to byte `to` (not overlapping) in every buffer; `false` if it failed.
    fn copy_within(&mut self, from: usize, to: usize, n: usize) -> bool;
    /// The buffers' addresses as the kernels see them (valid until the next resize).
    fn pointers(&mut self) -> Vec<*mut f32>;
    /// Bytes held now.
    fn resident_bytes(&self) -> usize;
    /// The id under which the other ranks of a sharded model mirror this memory (rank 0 only).
    fn mirror(&self) -> Option<u64> {
        None
    }
}

/// Buffers in host memory, for artifacts that run on the CPU.
pub(crate) struct HostKv(Vec<Vec<f32>>);

impl HostKv {
    pub(crate) fn new(kv: &KvGeometry) -> HostKv {
        HostKv(vec![Vec::new(); 2 * kv.layers])
    }
}

impl KvMemory for HostKv {
    fn resize(&mut self, bytes: usize) -> bool {
        for b in &mut self.0 {
            b.resize(bytes.div_ceil(4), 0.0);
        }
        true
    }

    fn copy_within(&mut self, from: usize, to: usize, n: usize) -> bool {
        // Blocks start on whole f32 words (a block is 16 rows: a multiple of 4 bytes whatever a row holds);
        // the last word may take up to 3 bytes after the rows, still in the block.
        let (from, to, words) = (from / 4, to / 4, n.div_ceil(4));
        for b in &mut self.0 {
            b.copy_within(from..from + words, to);
        }
        true
    }

    fn pointers(&mut self) -> Vec<*mut f32> {
        self.0.iter_mut().map(|b| b.as_mut_ptr()).collect()
    }

    fn resident_bytes(&self) -> usize {
        self.0.iter().map(|b| 4 * b.len()).sum()
    }
}

/// Blocks a pool starts with (256 tokens).
const INITIAL_BLOCKS: usize = 256 / KV_BLOCK_TOKENS;

/// Every layer's K and V blocks.
pub(crate) struct KvPool {
    /// 2 per layer (K, V), each `blocks · KV_BLOCK_TOKENS` rows of `row_bytes`.
    memory: Box<dyn KvMemory>,
    row_bytes: usize,
    /// Blocks the buffers hold now, and may grow to.
    blocks: usize,
    max_blocks: usize,
    /// Blocks no sequence holds (taken from the end).
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
}

impl KvPool {
    /// An empty pool for up to `tokens` cached tokens (rounded up to whole blocks) in `memory`.
    pub(crate) fn new(kv: &KvGeometry, tokens: usize, memory: Box<dyn KvMemory>) -> KvPool {
        let mut pool = KvPool {
            memory,
            row_bytes: kv.row_bytes(),
            blocks: 0,
            max_blocks: tokens.div_ceil(KV_BLOCK_TOKENS),
            free: Vec::new(),
            refs: Vec::new(),
        };
        pool.grow(INITIAL_BLOCKS.min(pool.max_blocks));
        pool
    }

    /// Tokens the pool may hold.
    pub(crate) fn capacity(&self) -> usize {
        self.max_blocks * KV_BLOCK_TOKENS
    }

    /// Tokens its free blocks, present and still to be allocated, hold.
    pub(crate) fn free_tokens(&self) -> usize {
        (self.free.len() + self.max_blocks - self.blocks) * KV_BLOCK_TOKENS
    }

    /// Makes the buffers hold `blocks` blocks, the new ones free. Where the memory cannot be had, the pool
    /// stops growing: its limit becomes what it holds.
    fn grow(&mut self, blocks: usize) {
        if !self
            .memory
            .resize(blocks * KV_BLOCK_TOKENS * self.row_bytes)
        {
            self.max_blocks = self.blocks;
            return;
        }
        // Free blocks are taken from the end: the lowest numbers first.
        self.free
            .splice(0..0, (self.blocks as u32..blocks as u32).rev());
        self.refs.resize(blocks, 0);
        self.blocks = blocks;
    }

    /// A free block, growing the pool if it has none; `None` when it is full.
    fn take(&mut self) -> Option<u32> {
        if self.free.is_empty() && self.blocks < self.max_blocks {
            self.grow((2 * self.blocks).clamp(1, self.max_blocks));
        }
        let block = self.free.pop()?;
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Drops one sequence's hold on `block`, freeing it with the last.
    fn release(&mut self, block: u32) {
        let refs = &mut self.refs[block as usize];
        *refs -= 1;
        if *refs == 0 {
            self.free.push(block);
        }
    }

    /// Copies the first `rows` rows of block `from` into block `to`, in every layer's K and V; `false` if
    /// the memory failed to.
    fn copy_rows(&mut self, from: u32, to: u32, rows: usize) -> bool {
        let block = KV_BLOCK_TOKENS * self.row_bytes;
        self.memory.copy_within(
            from as usize * block,
            to as usize * block,
            rows * self.row_bytes,
        )
    }

    /// The buffers' addresses, as `q3c_step.kv` lists them (valid until the pool grows).
    pub(crate) fn pointers(&mut self) -> Vec<*mut f32> {
        self.memory.pointers()
    }

    /// The id the other ranks of a sharded model know the pool by (on rank 0).
    pub(crate) fn mirror(&self) -> Option<u64> {
        self.memory.mirror()
    }

    /// Bytes of cache memory held now.
    pub(crate) fn resident_bytes(&self) -> usize {
        self.memory.resident_bytes()
    }
}

/// One sequence's tokens in a pool: its block table and how many positions it holds.
#[derive(Default)]
pub(crate) struct SeqBlocks {
    pub(crate) blocks: Vec<u32>,
    pub(crate) len: usize,
}

impl SeqBlocks {
    /// Takes blocks until the table covers `tokens` positions; `false` (having taken none) if the pool
    /// cannot hold them.
    pub(crate) fn reserve(&mut self, pool: &mut KvPool, tokens: usize) -> bool {
        let needed = tokens.div_ceil(KV_BLOCK_TOKENS);
        let more = needed.saturating_sub(self.blocks.len());
        if more * KV_BLOCK_TOKENS > pool.free_tokens() {
            return false;
        }
        let mut taken = Vec::with_capacity(more);
        for _ in 0..more {
            match pool.take() {
                Some(block) => taken.push(block),
                // The memory for more blocks could not be had: give back what was taken.
                None => {
                    taken.into_iter().for_each(|b| pool.release(b));
                    return false;
                }
            }
        }
        self.blocks.extend(taken);
        true
    }

    /// Keeps the first `len` positions (at most those held) and gives back the blocks past them.
    pub(crate) fn truncate(&mut self, pool: &mut KvPool, len: usize) {
        self.len = self.len.min(len);
        let keep = self.len.div_ceil(KV_BLOCK_TOKENS);
        while self.blocks.len() > keep {
            pool.release(self.blocks.pop().expect("counted"));
        }
        // The next position's block must be this sequence's alone: copy a shared partial one.
        let within = self.len % KV_BLOCK_TOKENS;
        if let Some(&last) = self.blocks.last() {
            if within != 0 && pool.refs[last as usize] > 1 {
                match pool.take() {
                    Some(own) if pool.copy_rows(last, own, within) => {
                        pool.release(last);
                        *self.blocks.last_mut().expect("non-empty") = own;
                    }
                    // No block to copy into: keep only the whole blocks.
                    taken => {
                        if let Some(own) = taken {
                            pool.release(own);
                        }
                        self.truncate(pool, self.len - within);
                    }
                }
            }
        }
    }

    /// A new sequence holding the first `len` tokens of this one (at most those held): its whole blocks
    /// shared, a partial last one copied. `None` if the pool has no block for that copy.
    pub(crate) fn fork(&self, pool: &mut KvPool, len: usize) -> Option<SeqBlocks> {
        let len = len.min(self.len);
        let whole = len / KV_BLOCK_TOKENS;
        let mut blocks: Vec<u32> = self.blocks[..whole].to_vec();
        let within = len % KV_BLOCK_TOKENS;
        if within != 0 {
            let own = pool.take()?;
            if !pool.copy_rows(self.blocks[whole], own, within) {
                pool.release(own);
                return None;
            }
            blocks.push(own);
        }
        for &b in &blocks[..whole] {
            pool.refs[b as usize] += 1;
        }
        Some(SeqBlocks { blocks, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> KvGeometry {
        KvGeometry {
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
            dtype: "f32".into(),
        }
    }

    fn host_pool(tokens: usize) -> KvPool {
        KvPool::new(&geometry(), tokens, Box::new(HostKv::new(&geometry())))
    }

    /// Every buffer of a host pool as f32 words.
    fn buffers(pool: &mut KvPool) -> Vec<&mut [f32]> {
        let words = pool.resident_bytes() / 4 / pool.pointers().len();
        pool.pointers()
            .into_iter()
            // SAFETY: a host pool's buffers are `words` f32s each, not overlapping.
            .map(|p| unsafe { std::slice::from_raw_parts_mut(p, words) })
            .collect()
    }

    #[test]
    fn sequences_take_and_give_back_blocks() {
        let mut pool = host_pool(1000);
        assert_eq!(pool.capacity(), 1008);
        let (mut a, mut b) = (SeqBlocks::default(), SeqBlocks::default());
        assert!(a.reserve(&mut pool, 40));
        assert_eq!(a.blocks, [0, 1, 2]);
        assert!(b.reserve(&mut pool, 1));
        assert_eq!(b.blocks, [3]);
        // Growing past the first 16 blocks doubles the buffers; block numbers stay.
        assert!(a.reserve(&mut pool, 20 * KV_BLOCK_TOKENS));
        assert_eq!(pool.blocks, 32);
        assert_eq!(&a.blocks[..3], [0, 1, 2]);
        a.len = 20 * KV_BLOCK_TOKENS;
        a.truncate(&mut pool, 17);
        assert_eq!((a.len, a.blocks.len()), (17, 2));
        // More than the pool can hold: refused, nothing taken.
        let free = pool.free_tokens();
        assert!(!b.reserve(&mut pool, 2000));
        assert_eq!(pool.free_tokens(), free);
        assert_eq!(b.blocks.len(), 1);
    }

    #[test]
    fn forks_share_whole_blocks_and_copy_a_partial_one() {
        let mut pool = host_pool(1000);
        let mut a = SeqBlocks::default();
        assert!(a.reserve(&mut pool, 40));
        a.len = 40;
        // Mark each of a's rows (every layer's K and V) with its position.
        let row_of = |s: &SeqBlocks, p: usize| {
            s.blocks[p / KV_BLOCK_TOKENS] as usize * KV_BLOCK_TOKENS + p % KV_BLOCK_TOKENS
        };
        for p in 0..40 {
            let row = row_of(&a, p);
            for b in buffers(&mut pool) {
                b[row * 4..row * 4 + 4].fill(p as f32);
            }
        }
        let free = pool.free_tokens();
        let mut f = a.fork(&mut pool, 37).unwrap();
        assert_eq!(f.len, 37);
        assert_eq!(&f.blocks[..2], &a.blocks[..2]);
        assert_ne!(f.blocks[2], a.blocks[2]);
        assert_eq!(pool.free_tokens(), free - KV_BLOCK_TOKENS);
        let row = row_of(&f, 36);
        assert!(buffers(&mut pool).iter().all(|b| b[row * 4] == 36.0));
        // Closing a keeps the shared blocks for f; only a's own third block comes back.
        a.truncate(&mut pool, 0);
        assert_eq!(pool.free_tokens(), free);
        // Forking at a block boundary shares everything; cutting inside a shared block copies it.
        let mut g = f.fork(&mut pool, 32).unwrap();
        assert_eq!(g.blocks, f.blocks[..2]);
        g.truncate(&mut pool, 20);
        assert_ne!(g.blocks[1], f.blocks[1]);
        let row = row_of(&g, 19);
        assert!(buffers(&mut pool).iter().all(|b| b[row * 4] == 19.0));
        f.truncate(&mut pool, 0);
        g.truncate(&mut pool, 0);
        assert_eq!(pool.free_tokens(), pool.capacity());
    }
}
