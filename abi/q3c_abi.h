/* q3c model artifact ABI, version 6.
 *
 * A q3c artifact (model.so) exports exactly these symbols; everything else in it is hidden.
 * It imports nothing beyond libc/libm: runtime services arrive through q3c_services.
 * Weights are not inside the artifact: the caller binds them, in manifest order, at load time. */
#ifndef Q3C_ABI_H
#define Q3C_ABI_H
#include <stdint.h>

#define Q3C_ABI_VERSION 6u

/* Status codes returned by q3c_forward. */
#define Q3C_OK 0
#define Q3C_ERR_TOKENS 1      /* t == 0 or t > manifest.max_tokens_per_call, or n_logits outside 1..=t */
#define Q3C_ERR_TOKEN_ID 2    /* a token id outside the vocabulary */

/* A kernel over work items [start, end). */
typedef void (*q3c_kernel)(const uint64_t *args, uint64_t start, uint64_t end);

/* Services the runtime lends the artifact. */
typedef struct q3c_services {
    /* Runs kernel(args, s, e) over disjoint ranges covering [0, n), possibly on several threads,
     * and returns when all are done. */
    void (*parallel_for)(void *pool, q3c_kernel kernel, const uint64_t *args, uint64_t n);
    void *pool;
    /* Only artifacts of sharded models (manifest.ranks > 1) call it: a collective among the ranks over
     * args = [t, step, x, out], n = x's floats. op Q3C_ALL_GATHER: every rank's x side by side in each row
     * of out, by rank (a row of x is n / t floats). op Q3C_ALL_REDUCE | parts << 8: out = the sum of x over
     * the ranks r for which r * parts % ranks < parts (the first rank of each of `parts` parts). Returns
     * when out holds the result; a rank that cannot complete it ends the job. */
    void (*collective)(void *ctx, uint64_t op, const uint64_t *args, uint64_t n);
    void *collective_ctx;
} q3c_services;

#define Q3C_ALL_REDUCE 0u
#define Q3C_ALL_GATHER 1u

/* Tokens a KV-cache block holds. The cache of each layer is a pool of blocks; a sequence's block table
 * lists the pool block holding each run of Q3C_KV_BLOCK_TOKENS consecutive positions, so position p of a
 * sequence lives in cache row blocks[p / Q3C_KV_BLOCK_TOKENS] * Q3C_KV_BLOCK_TOKENS + p % Q3C_KV_BLOCK_TOKENS. */
#define Q3C_KV_BLOCK_TOKENS 16u

/* One sequence of a forward call. */
typedef struct q3c_seq {
    const uint32_t *blocks;        /* its block table: enough blocks for every position it reaches in this call */
    uint64_t end;                  /* the row after its last row in this call */
} q3c_seq;

/* One forward call: t new tokens, from one or more sequences. The rows of a sequence are consecutive and
 * their positions ascend by one (a sequence's row at position p sees its own keys at positions 0..=p). */
typedef struct q3c_step {
    const int32_t *ids;            /* [t] */
    uint64_t t;
    const uint32_t *pos;           /* [t] each row's position in its sequence */
    const uint32_t *seq;           /* [t] each row's sequence, an index into seqs */
    const q3c_seq *seqs;           /* [n_seqs] */
    uint64_t n_seqs;
    const void *const *weights;    /* one pointer per manifest weight, in manifest order */
    float *const *kv;              /* 2 per layer: K0, V0, K1, V1, ...; each a pool of blocks, [blocks *
                                      Q3C_KV_BLOCK_TOKENS, kv_heads] rows of head_dim elements of the
                                      manifest's kv.dtype: f32, IEEE f16 or bf16 (2 bytes each), or q8
                                      (head_dim int8, then one float scale per group of up to 32) */
    uint8_t *scratch;              /* manifest.scratch_bytes_per_token * manifest.max_tokens_per_call bytes, 64-aligned */
    float *logits;                 /* [n_logits, vocab] f32, or [t, vocab] when logit_rows is NULL */
    const q3c_services *services;
    const uint32_t *logit_rows;    /* ascending rows whose logits are written, in order; NULL: every row */
    uint64_t n_logits;             /* entries of logit_rows (1..=t) */
    uint64_t rank;                 /* this process's rank of a sharded model (manifest.ranks > 1), else 0 */
} q3c_step;

extern const uint32_t q3c_abi_version;        /* == Q3C_ABI_VERSION */
extern const uint8_t q3c_manifest[];          /* UTF-8 JSON, q3c_manifest_len bytes */
extern const uint64_t q3c_manifest_len;
int32_t q3c_forward(const q3c_step *step);

/* An artifact whose manifest has a "launch" plan (the GPU flavour compiled for the CPU) exports no q3c_forward:
 * the runtime fills each dispatch's argument block ([T, the step, pointers...] as the plan's "args" say) and calls
 * the dispatch's kernel for every block and thread of its grid: ceil(items / threads) blocks, or, where the
 * dispatch's "threads_per_item" is above 1, one block of that many threads per item (thread 0 runs it on a CPU).
 * A CUDA artifact (`q3c compile --target cuda`; layout in abi/src/cuda.rs) holds the same kernels as PTX entries
 * kernel(const uint64_t *args, uint64_t items), launched on the same grids with the step in device memory. */
typedef void (*q3c_launched_kernel)(const uint64_t *args, uint64_t items, uint64_t block, uint64_t threads,
                                    uint64_t thread);

#endif
