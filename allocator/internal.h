/* Allocator internals shared by the files of allocator/; nothing outside allocator/
 * includes this. */
#ifndef WA_INTERNAL_H
#define WA_INTERNAL_H

#include "allocator/allocator.h"

/* PyTorch's constants (c10/cuda/CUDACachingAllocator.cpp, top of file). */
#define WA_MIN_BLOCK_SIZE   512ULL                /* kMinBlockSize */
#define WA_SMALL_SIZE       (1ULL << 20)          /* kSmallSize: largest small request */
#define WA_SMALL_BUFFER     (2ULL << 20)          /* kSmallBuffer: small-pool segment */
#define WA_LARGE_BUFFER     (20ULL << 20)         /* kLargeBuffer */
#define WA_MIN_LARGE_ALLOC  (10ULL << 20)         /* kMinLargeAlloc */
#define WA_ROUND_LARGE      (2ULL << 20)          /* kRoundLarge */

typedef struct wa_segment wa_segment;

/* A block: a run of bytes inside one segment, free or handed out.
 * Invariant: the blocks of a segment, followed through next, tile it exactly
 * from its first byte to its last; two free blocks are never neighbours. */
struct wa_block {
    uint64_t addr, size;
    uint64_t requested;          /* 0 while free */
    wa_segment *seg;
    wa_block *prev, *next;       /* address neighbours in the segment */
    wa_block *left, *right;      /* free-tree links, while free */
    uint32_t prio;               /* free-tree heap priority */
    bool allocated;
    bool counted_oversize;       /* counted in oversize_allocations when handed out */
    uint64_t gc_base;            /* pool's get_free_block count when freed */
};

/* A free-block pool ordered by (size, address): best fit is the first block
 * at or after (size, 0). A treap keyed by (size, address). */
typedef struct wa_pool {
    wa_block *root;
    size_t count;
    bool small;
    uint64_t get_free_calls;     /* PyTorch's get_free_blocks_call_count */
} wa_pool;

struct wa_segment {
    wa_mem mem;
    uint64_t size;
    uint32_t id;
    int device;
    bool small;
    bool counted_oversize;       /* counted in oversize_segments when made */
    wa_block *head;              /* first block (lowest address) */
    wa_segment *prev, *next;     /* the device's segment list */
};

typedef struct wa_device {
    wa_pool small, large;
    wa_segment *segments;
    wa_stats stats;
    uint64_t limit;              /* capacity: reserved may not exceed it */
} wa_device;

struct wa_allocator {
    wa_backend *backend;
    int n_devices;
    wa_device *dev;
    wa_config conf;
    wa_config *stack;            /* configurations saved by wa_policy_push */
    size_t depth, stack_cap;
    uint32_t next_segment_id;
    uint32_t prio_state;
};

/* pool.c: the free-block treap */
void wa__pool_insert(wa_pool *pool, wa_block *b);
void wa__pool_erase(wa_pool *pool, wa_block *b);
/* Smallest block with (size, addr) >= (size, 0), or NULL. */
wa_block *wa__pool_lower_bound(const wa_pool *pool, uint64_t size);
/* Largest block whose key is below (size, addr), or NULL; (UINT64_MAX,
 * UINT64_MAX) gives the largest block. */
wa_block *wa__pool_before(const wa_pool *pool, uint64_t size, uint64_t addr);
wa_block *wa__pool_max(const wa_pool *pool);
/* Visits every block in key order; the callback may not change the pool. */
void wa__pool_each(const wa_pool *pool, void (*fn)(wa_block *b, void *ctx), void *ctx);
/* Fills out (capacity pool->count) in key order; returns how many. */
size_t wa__pool_collect(const wa_pool *pool, wa_block **out);

#endif
