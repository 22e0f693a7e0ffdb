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

use q3c_abi::{KvGeometry, KV_BLOCK_TOKENS};

/// Blocks a pool starts with (256 tokens).
const INITIAL_BLOCKS: usize = 256 / KV_BLOCK_TOKENS;

/// Every layer's K and V blocks.
pub(crate) struct KvPool {
    /// 2 per layer (K, V), each `blocks · KV_BLOCK_TOKENS` rows of `row_bytes`, held as f32 words.
    buffers: Vec<Vec<f32>>,
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
    /// An empty pool for up to `tokens` cached tokens (rounded up to whole blocks).
    pub(crate) fn new(kv: &KvGeometry, tokens: usize) -> KvPool {
        let mut pool = KvPool {
            buffers: vec![Vec::new(); 2 * kv.layers],
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

    /// Makes the buffers hold `blocks` blocks, the new ones free.
    fn grow(&mut self, blocks: usize) {
        let words = (blocks * KV_BLOCK_TOKENS * self.row_bytes).div_ceil(4);
        for b in &mut self.buffers {
            b.resize(words, 0.0);
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

    /// Copies the first `rows` rows of block `from` into block `to`, in every layer's K and V.
    fn copy_rows(&mut self, from: u32, to: u32, rows: usize) {
        let words = KV_BLOCK_TOKENS * self.row_bytes / 4;
        let n = (rows * self.row_bytes).div_ceil(4);
        for b in &mut self.buffers {
            let src = from as usize * words;
            b.copy_within(src..src + n, to as usize * words);
        }
    }

    /// The buffers' addresses, as `q3c_step.kv` lists them (valid until the pool grows).
    pub(crate) fn pointers(&mut self) -> Vec<*mut f32> {
        self.buffers.iter_mut().map(|b| b.as_mut_ptr()).collect()
    }

    /// Bytes of cache memory held now.
    pub(crate) fn resident_bytes(&self) -> usize {
        self.buffers.iter().map(|b| 4 * b.len()).sum()
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
        for _ in 0..more {
            self.blocks.push(pool.take().expect("counted free blocks"));
        }
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
                    Some(own) => {
                        pool.copy_rows(last, own, within);
                        pool.release(last);
                        *self.blocks.last_mut().expect("non-empty") = own;
                    }
                    // No block to copy into: keep only the whole blocks.
                    None => self.truncate(pool, self.len - within),
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
            pool.copy_rows(self.blocks[whole], own, within);
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

    #[test]
    fn sequences_take_and_give_back_blocks() {
        let mut pool = KvPool::new(&geometry(), 1000);
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
        let mut pool = KvPool::new(&geometry(), 1000);
        let mut a = SeqBlocks::default();
        assert!(a.reserve(&mut pool, 40));
        a.len = 40;
        // Mark each of a's rows (every layer's K and V) with its position.
        let row_of = |s: &SeqBlocks, p: usize| {
            s.blocks[p / KV_BLOCK_TOKENS] as usize * KV_BLOCK_TOKENS + p % KV_BLOCK_TOKENS
        };
        for p in 0..40 {
            let row = row_of(&a, p);
            for b in &mut pool.buffers {
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
        assert!(pool.buffers.iter().all(|b| b[row * 4] == 36.0));
        // Closing a keeps the shared blocks for f; only a's own third block comes back.
        a.truncate(&mut pool, 0);
        assert_eq!(pool.free_tokens(), free);
        // Forking at a block boundary shares everything; cutting inside a shared block copies it.
        let mut g = f.fork(&mut pool, 32).unwrap();
        assert_eq!(g.blocks, f.blocks[..2]);
        g.truncate(&mut pool, 20);
        assert_ne!(g.blocks[1], f.blocks[1]);
        let row = row_of(&g, 19);
        assert!(pool.buffers.iter().all(|b| b[row * 4] == 19.0));
        f.truncate(&mut pool, 0);
        g.truncate(&mut pool, 0);
        assert_eq!(pool.free_tokens(), pool.capacity());
    }
}
