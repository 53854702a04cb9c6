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
#define WA_UNMAPPED         UINT32_MAX

typedef struct wa_segment wa_segment;

/* A block: a run of bytes inside one segment, free or handed out.
 * Invariant: the blocks of a segment, followed through next, tile it exactly
 * from its first byte to its last; two free blocks with the same mapped state
 * are never neighbours. In an expandable segment, unmapped blocks cover whole
 * pages that have no memory behind them. */
struct wa_block {
    uint64_t addr, size;
    uint64_t requested;          /* 0 while free */
    wa_segment *seg;
    wa_block *prev, *next;       /* address neighbours in the segment */
    wa_block *left, *right;      /* tree links, while in a pool's tree */
    uint32_t prio;               /* tree heap priority */
    bool allocated;
    bool mapped;                 /* false only for unmapped ranges of expandable segments */
    bool counted_oversize;       /* counted in oversize_allocations when handed out */
    uint64_t gc_base;            /* pool's get_free_block count when freed */
};

/* A treap of blocks, ordered by (size, address) — best fit is the first
 * block at or after (size, 0) — or by address alone. */
typedef struct wa_tree {
    wa_block *root;
    size_t count;
    bool by_addr;
} wa_tree;

typedef struct wa_pool {
    wa_tree blocks;              /* free mapped blocks, by (size, address) */
    wa_tree unmapped;            /* unmapped ranges of expandable segments, by address */
    bool small;
    uint64_t get_free_calls;     /* PyTorch's get_free_blocks_call_count */
} wa_pool;

/* The pools of one stream under one tag. PyTorch keys its free blocks by
 * stream first, so a block freed on a stream is handed out again on that
 * stream only, and keeps a private pool's (MemPool's) segments apart; an
 * arena is that pair of keys. Every device has the common arena (stream 0,
 * tag 0, what the daemon uses); the others are made as requests name them
 * and live as long as the allocator. */
typedef struct wa_arena {
    wa_pool small, large;
    uint64_t stream;
    uint32_t tag;
    bool asleep;                 /* its tag sleeps: no requests; its segments are left alone */
    struct wa_arena *next;
} wa_arena;

/* A sleeping segment's bytes kept in host memory (wa_tag_sleep, offload). */
typedef struct wa_saved {
    uint64_t offset, len;        /* within the segment */
    void *buf;
} wa_saved;

struct wa_segment {
    wa_mem mem;                  /* the segment, or an expandable segment's address range */
    uint64_t size;
    uint32_t id;
    int device;
    bool small;
    bool counted_oversize;       /* counted in oversize_segments when made */
    bool expandable;
    wa_arena *arena;             /* whose pools its free blocks are in */
    bool asleep;                 /* its memory is evicted (wa_tag_sleep); the addresses stay */
    wa_saved *saved;             /* asleep with offload: the bytes of its blocks then handed out */
    size_t n_saved;
    uint64_t page;               /* expandable: bytes per page */
    bool coalesce;               /* expandable: one physical allocation per mapping */
    /* Expandable: the physical allocations. chunk[i] is the first page of the
     * allocation that maps page i (WA_UNMAPPED if none); pages[h] is that
     * allocation's memory, for its first page h only (size 0 elsewhere). */
    wa_mem *pages;
    uint32_t *chunk;
    size_t n_pages;              /* entries in pages and chunk (grows as pages are mapped) */
    wa_block *head;              /* first block (lowest address) */
    wa_segment *prev, *next;     /* the device's segment list */
};

typedef struct wa_device {
    wa_arena common;             /* stream 0, tag 0; the others follow it (next) */
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
    uint32_t *tags;              /* the tags asleep */
    size_t n_tags, cap_tags;
};

static inline void wa__stat_add(wa_stat *s, uint64_t amount)
{
    s->current += (int64_t)amount;
    if (s->current > s->peak)
        s->peak = s->current;
}

static inline void wa__stat_sub(wa_stat *s, uint64_t amount)
{
    s->current -= (int64_t)amount;
}

static inline bool wa__is_split(const wa_block *b)
{
    return b->prev || b->next;
}

/* Links nb into b's segment just before b (the segment's head if b was), or
 * just after it. */
static inline void wa__link_before(wa_block *b, wa_block *nb)
{
    nb->prev = b->prev;
    nb->next = b;
    if (b->prev)
        b->prev->next = nb;
    else
        b->seg->head = nb;
    b->prev = nb;
}

static inline void wa__link_after(wa_block *b, wa_block *nb)
{
    nb->prev = b;
    nb->next = b->next;
    if (b->next)
        b->next->prev = nb;
    b->next = nb;
}

static inline wa_pool *wa__pool_of(const wa_block *b)
{
    return b->seg->small ? &b->seg->arena->small : &b->seg->arena->large;
}

/* allocator.c */
/* try_merge_blocks(): b absorbs its free neighbour n (same mapped state);
 * returns n's size, or 0 when they cannot merge. */
uint64_t wa__merge(wa_block *b, wa_block *n);

/* b, out of its pool, is handed out: allocated, with its statistics. */
void wa__count_handed_out(const wa_allocator *a, wa_device *d, wa_block *b, uint64_t requested);

/* segment.c: taking memory from the device and giving it back */
/* alloc_block(): a new segment of `size` bytes in arena ar, as one free
 * block, not in a pool. */
int wa__segment_new(wa_allocator *a, int device, wa_arena *ar, uint64_t size, bool small, wa_block **out,
                    wd_error *err);
/* try_allocate_expandable_block(): a free mapped block of at least `size`
 * bytes in an expandable segment, mapping pages as needed; not in a pool. */
int wa__expandable_alloc(wa_allocator *a, int device, wa_arena *ar, wa_pool *pool, uint64_t size, wa_block **out,
                         wd_error *err);
/* Every arena of the device that is awake. */
void wa__release_cached(wa_allocator *a, int device);
/* expandable_coalesce: the physical allocations wholly inside the free block
 * b go back to the device now (b may be merged away). */
void wa__release_free_chunks(wa_allocator *a, wa_block *b);
bool wa__release_available(wa_allocator *a, wa_pool *pool, uint64_t size);
void wa__garbage_collect(wa_allocator *a, wa_device *d);
/* Every page of the expandable segment seg that is mapped. */
uint64_t wa__mapped_bytes(const wa_segment *seg);

/* sleep.c: a sleeping tag's segments freed on destroy (their memory is gone already). */
void wa__sleep_forget(wa_allocator *a);

/* tree.c: the treaps */
void wa__tree_insert(wa_tree *t, wa_block *b);
void wa__tree_erase(wa_tree *t, wa_block *b);
/* The first block whose key is at or after (size, addr) — by (size, addr)
 * trees — or at or after addr (by-address trees; size ignored). NULL if none. */
wa_block *wa__tree_lower_bound(const wa_tree *t, uint64_t size, uint64_t addr);
/* The first block after b, or the last block before b, in the tree's order. */
wa_block *wa__tree_next(const wa_tree *t, const wa_block *b);
wa_block *wa__tree_prev(const wa_tree *t, const wa_block *b);
wa_block *wa__tree_max(const wa_tree *t);
/* Fills out (room for t->count) in order; returns how many. */
size_t wa__tree_collect(const wa_tree *t, wa_block **out);

#endif
