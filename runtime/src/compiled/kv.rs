//! The KV cache of compiled artifacts: per layer, K and V pools of blocks of
//! [`KV_BLOCK_TOKENS`] rows, and each sequence's block table (ABI 4, `q3c_abi.h`).
//!
//! A pool grows by doubling (from [`INITIAL_BLOCKS`]) up to its limit, so a generous limit costs memory
//! only when used; growing moves the buffers but not the blocks' numbers, so block tables stay valid.
//! Sequences take free blocks as they grow and give them back when cut or closed, so several sequences
//! share one pool without reserving their whole context each.

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
        self.blocks = blocks;
    }

    /// A free block, growing the pool if it has none; `None` when it is full.
    fn take(&mut self) -> Option<u32> {
        if self.free.is_empty() && self.blocks < self.max_blocks {
            self.grow((2 * self.blocks).clamp(1, self.max_blocks));
        }
        self.free.pop()
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
        let keep = len.div_ceil(KV_BLOCK_TOKENS);
        while self.blocks.len() > keep {
            pool.free.push(self.blocks.pop().expect("counted"));
        }
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
}
