/* The caching allocator. The rules follow PyTorch's DeviceCachingAllocator
 * (c10/cuda/CUDACachingAllocator.cpp); each carries a pointer to the function
 * that does the same there. One stream per device: weightd's allocations have
 * no stream affinity. */
#include "allocator/internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/size.h"

/* ---- statistics helpers (increase_stat / decrease_stat) ----------------- */

static void stat_add(wa_stat *s, uint64_t amount)
{
    s->current += (int64_t)amount;
    if (s->current > s->peak)
        s->peak = s->current;
}

static void stat_sub(wa_stat *s, uint64_t amount)
{
    s->current -= (int64_t)amount;
}

/* ---- sizes ------------------------------------------------------------- */

/* AllocatorConfig::roundup_power2_divisions(size): intervals 1 MiB..64 GiB. */
static uint32_t divisions_for(const wa_config *conf, uint64_t size)
{
    int index = (int)(63 - __builtin_clzll(size)) - 20;

    if (index < 0)
        index = 0;
    if (index > WA_ROUNDUP_INTERVALS - 1)
        index = WA_ROUNDUP_INTERVALS - 1;
    return conf->roundup_power2_divisions[index];
}

/* roundup_power2_next_division() */
static uint64_t round_to_division(uint64_t size, uint64_t divisions)
{
    uint64_t floor2, step, rounded;

    if (!(size & (size - 1)))
        return size;
    floor2 = 1ULL << (63 - __builtin_clzll(size));
    step = floor2 >> (63 - __builtin_clzll(divisions));
    if (step == 0)
        return floor2 << 1;
    rounded = size & ~(step - 1);
    return rounded == size ? size : rounded + step;
}

/* round_size() */
static uint64_t round_size(const wa_config *conf, uint64_t size)
{
    uint32_t div;

    if (size < WA_MIN_BLOCK_SIZE)
        return WA_MIN_BLOCK_SIZE;
    div = divisions_for(conf, size);
    if (div > 1 && size > WA_MIN_BLOCK_SIZE * div)
        return round_to_division(size, div);
    return WA_MIN_BLOCK_SIZE * ((size + WA_MIN_BLOCK_SIZE - 1) / WA_MIN_BLOCK_SIZE);
}

/* get_allocation_size(): the segment made for a request that no cached block serves. */
static uint64_t segment_size_for(uint64_t size)
{
    if (size <= WA_SMALL_SIZE)
        return WA_SMALL_BUFFER;
    if (size < WA_MIN_LARGE_ALLOC)
        return WA_LARGE_BUFFER;
    return WA_ROUND_LARGE * ((size + WA_ROUND_LARGE - 1) / WA_ROUND_LARGE);
}

static bool is_split(const wa_block *b)
{
    return b->prev || b->next;
}

static wa_pool *pool_of(wa_device *d, const wa_block *b)
{
    return b->seg->small ? &d->small : &d->large;
}

/* ---- segments (alloc_block / release_block) ----------------------------- */

static int segment_new(wa_allocator *a, int device, uint64_t size, bool small,
                       wa_block **out, wd_error *err)
{
    wa_device *d = &a->dev[device];
    wa_segment *seg;
    wa_block *b;
    int rc;

    /* alloc_block(): with a memory fraction set, refuse before asking the device. */
    if (d->limit && (uint64_t)d->stats.reserved_bytes.current + size > d->limit)
        return -ENOMEM;
    seg = calloc(1, sizeof *seg);
    b = calloc(1, sizeof *b);
    if (!seg || !b) {
        rc = wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
        goto fail;
    }
    if ((rc = a->backend->seg_alloc(a->backend, device, size, &seg->mem, err)))
        goto fail;
    seg->size = size;
    seg->device = device;
    seg->small = small;
    seg->id = a->next_segment_id++;
    seg->head = b;
    seg->next = d->segments;
    if (d->segments)
        d->segments->prev = seg;
    d->segments = seg;
    b->addr = seg->mem.addr;
    b->size = size;
    b->seg = seg;

    stat_add(&d->stats.segment, 1);
    stat_add(&d->stats.reserved_bytes, size);
    if (size >= a->conf.max_split_size) {
        seg->counted_oversize = true;
        stat_add(&d->stats.oversize_segments, 1);
    }
    d->stats.num_device_alloc++;
    *out = b;
    return 0;
fail:
    free(seg);
    free(b);
    return rc;
}

/* release_block(): b is free, unsplit and in its pool. */
static void segment_release(wa_allocator *a, wa_block *b)
{
    wa_segment *seg = b->seg;
    wa_device *d = &a->dev[seg->device];

    wa__pool_erase(pool_of(d, b), b);
    a->backend->seg_free(a->backend, seg->device, &seg->mem);
    stat_sub(&d->stats.segment, 1);
    stat_sub(&d->stats.reserved_bytes, seg->size);
    if (seg->counted_oversize)
        stat_sub(&d->stats.oversize_segments, 1);
    d->stats.num_device_free++;
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        d->segments = seg->next;
    if (seg->next)
        seg->next->prev = seg->prev;
    free(seg);
    free(b);
}

/* release_blocks(): every unsplit free block of a pool goes back to the device. */
static void release_pool(wa_allocator *a, wa_pool *pool)
{
    size_t n = pool->count;
    wa_block **all;

    if (!n)
        return;
    if (!(all = malloc(n * sizeof *all))) {
        /* Without scratch space, release one at a time from the top. */
        for (wa_block *b = wa__pool_max(pool), *prev; b; b = prev) {
            prev = wa__pool_before(pool, b->size, b->addr);
            if (!is_split(b))
                segment_release(a, b);
        }
        return;
    }
    n = wa__pool_collect(pool, all);
    for (size_t i = 0; i < n; i++)
        if (!is_split(all[i]))
            segment_release(a, all[i]);
    free(all);
}

/* release_cached_blocks() */
static void release_cached(wa_allocator *a, int device)
{
    release_pool(a, &a->dev[device].large);
    release_pool(a, &a->dev[device].small);
}

/* release_available_cached_blocks(): free oversize cached blocks, just enough
 * for the request, largest first. Only when max_split_size is set. */
static bool release_available(wa_allocator *a, wa_pool *pool, uint64_t size)
{
    uint64_t max_split = a->conf.max_split_size, want, released = 0;
    wa_block *b;

    if (max_split == UINT64_MAX)
        return false;
    want = size < max_split ? max_split : size;
    if ((b = wa__pool_lower_bound(pool, want))) {
        /* A split block cannot go back alone; oversize blocks are never split,
         * so this only happens after max_split_size grew. */
        if (is_split(b))
            return false;
        segment_release(a, b);
        return true;
    }
    /* No single block is large enough: free oversize blocks, largest first. */
    b = wa__pool_max(pool);
    while (b && released < want && b->size >= max_split) {
        wa_block *below = wa__pool_before(pool, b->size, b->addr);
        if (!is_split(b)) {
            released += b->size;
            segment_release(a, b);
        }
        b = below;
    }
    return released >= want;
}

/* garbage_collect_cached_blocks(): when reserved passes the threshold share of
 * capacity, free unsplit cached large blocks older than the average age. */
static void garbage_collect(wa_allocator *a, wa_device *d)
{
    uint64_t threshold = (uint64_t)(a->conf.garbage_collection_threshold * (double)d->limit);
    uint64_t reserved = (uint64_t)d->stats.reserved_bytes.current, target, reclaimed = 0;
    uint64_t total_age = 0;
    size_t n, freeable = 0;
    wa_block **all;
    bool freed = true;

    if (reserved <= threshold || !d->large.count)
        return;
    target = reserved - threshold;
    if (!(all = malloc(d->large.count * sizeof *all)))
        return;
    n = wa__pool_collect(&d->large, all);
    for (size_t i = 0; i < n; i++)
        if (!is_split(all[i])) {
            total_age += d->large.get_free_calls - all[i]->gc_base;
            freeable++;
        }
    while (reclaimed < target && freed && freeable > 0) {
        double age_threshold = (double)total_age / (double)freeable;
        freed = false;
        for (size_t i = 0; i < n; i++) {
            wa_block *b = all[i];
            uint64_t age;
            if (!b || is_split(b))
                continue;
            age = d->large.get_free_calls - b->gc_base;
            if ((double)age >= age_threshold) {
                freed = true;
                reclaimed += b->size;
                total_age -= age;
                freeable--;
                all[i] = NULL;
                segment_release(a, b);
            }
        }
    }
    free(all);
}

/* ---- blocks ------------------------------------------------------------ */

/* get_free_block(): best fit, but an oversize block only serves a request that
 * is itself oversize and within max_non_split_rounding of it. */
static wa_block *take_free_block(wa_allocator *a, wa_pool *pool, uint64_t size)
{
    wa_block *b;

    if (a->conf.garbage_collection_threshold > 0)
        pool->get_free_calls++;
    b = wa__pool_lower_bound(pool, size);
    if (!b)
        return NULL;
    if (size < a->conf.max_split_size && b->size >= a->conf.max_split_size)
        return NULL;
    if (size >= a->conf.max_split_size && b->size >= size + a->conf.max_non_split_rounding)
        return NULL;
    wa__pool_erase(pool, b);
    return b;
}

/* should_split() */
static bool should_split(const wa_allocator *a, const wa_block *b, uint64_t size)
{
    uint64_t remaining = b->size - size;

    if (b->seg->small)
        return remaining >= WA_MIN_BLOCK_SIZE;
    return size < a->conf.max_split_size && remaining > WA_SMALL_SIZE;
}

/* alloc_found_block(): b is out of its pool; split off the remainder if the
 * rules say so and hand out the front. */
static wa_block *hand_out(wa_allocator *a, wa_device *d, wa_block *b, uint64_t size,
                          uint64_t requested, wa_block *spare)
{
    wa_pool *pool = pool_of(d, b);
    bool already_split = is_split(b);

    if (spare) {
        /* spare becomes the front part; b keeps the remainder, as in PyTorch. */
        spare->addr = b->addr;
        spare->size = size;
        spare->seg = b->seg;
        spare->prev = b->prev;
        if (spare->prev)
            spare->prev->next = spare;
        else
            b->seg->head = spare;
        spare->next = b;
        b->prev = spare;
        b->addr += size;
        b->size -= size;
        b->requested = 0;
        b->gc_base = pool->get_free_calls;
        wa__pool_insert(pool, b);
        if (already_split) {
            stat_sub(&d->stats.inactive_split_bytes, size);
        } else {
            stat_add(&d->stats.inactive_split_bytes, b->size);
            stat_add(&d->stats.inactive_split, 1);
        }
        b = spare;
    } else if (already_split) {
        stat_sub(&d->stats.inactive_split_bytes, b->size);
        stat_sub(&d->stats.inactive_split, 1);
    }
    b->allocated = true;
    b->requested = requested;
    stat_add(&d->stats.allocation, 1);
    stat_add(&d->stats.allocated_bytes, b->size);
    stat_add(&d->stats.active, 1);
    stat_add(&d->stats.active_bytes, b->size);
    stat_add(&d->stats.requested_bytes, requested);
    b->counted_oversize = b->size >= a->conf.max_split_size;
    if (b->counted_oversize)
        stat_add(&d->stats.oversize_allocations, 1);
    return b;
}

static void oom_message(wa_allocator *a, int device, uint64_t requested, uint64_t seg_size, wd_error *err)
{
    const wa_stats *s = &a->dev[device].stats;
    char want[32], asked[32], cap[32], freeb[32], alloc[32], unalloc[32];
    uint64_t reserved = (uint64_t)s->reserved_bytes.current;
    uint64_t allocated = (uint64_t)s->allocated_bytes.current;
    uint64_t limit = a->dev[device].limit;

    char request[64] = "";

    if (requested != seg_size)
        snprintf(request, sizeof request, " (for a request of %s)", wd_size_format(requested, asked, sizeof asked));
    wd_error_set(err, -ENOMEM,
                 "out of memory on device %d: tried to allocate %s%s; the device has a capacity of %s of which "
                 "%s is free; %s is allocated and %s is reserved but unallocated",
                 device, wd_size_format(seg_size, want, sizeof want), request, wd_size_format(limit, cap, sizeof cap),
                 wd_size_format(limit > reserved ? limit - reserved : 0, freeb, sizeof freeb),
                 wd_size_format(allocated, alloc, sizeof alloc),
                 wd_size_format(reserved - allocated, unalloc, sizeof unalloc));
}

/* malloc() */
int wa_malloc(wa_allocator *a, int device, uint64_t requested, wa_block **out, wd_error *err)
{
    wa_device *d;
    wa_pool *pool;
    wa_block *b, *spare = NULL;
    uint64_t size, seg_size;
    int rc;

    if (device < 0 || device >= a->n_devices)
        return wd_error_set(err, -ENODEV, "no device %d (this daemon has %d)", device, a->n_devices);
    if (requested > (UINT64_MAX >> 2))
        return wd_error_set(err, -EFBIG, "allocation of %" PRIu64 " bytes is too large", requested);
    d = &a->dev[device];
    size = round_size(&a->conf, requested);
    pool = size <= WA_SMALL_SIZE ? &d->small : &d->large;
    seg_size = segment_size_for(size);

    b = take_free_block(a, pool, size);
    if (!b) {
        if (a->conf.garbage_collection_threshold > 0 && d->limit)
            garbage_collect(a, d);
        rc = segment_new(a, device, seg_size, pool->small, &b, err);
        if (rc == -ENOMEM && release_available(a, pool, size))
            rc = segment_new(a, device, seg_size, pool->small, &b, err);
        if (rc == -ENOMEM) {
            release_cached(a, device);
            d->stats.num_alloc_retries++;
            rc = segment_new(a, device, seg_size, pool->small, &b, err);
        }
        if (rc == -ENOMEM) {
            d->stats.num_ooms++;
            oom_message(a, device, requested, seg_size, err);
            return -ENOMEM;
        }
        if (rc)
            return rc;
    }
    if (should_split(a, b, size) && !(spare = calloc(1, sizeof *spare))) {
        /* Put the block back untouched so nothing is half done. */
        b->gc_base = pool->get_free_calls;
        wa__pool_insert(pool, b);
        return wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
    }
    *out = hand_out(a, d, b, size, requested, spare);
    return 0;
}

/* try_merge_blocks(): absorb a free neighbour into b; returns its size or 0. */
static uint64_t merge(wa_device *d, wa_block *b, wa_block *n)
{
    uint64_t size;

    if (!n || n->allocated)
        return 0;
    wa__pool_erase(pool_of(d, n), n);
    if (b->prev == n) {
        b->addr = n->addr;
        b->prev = n->prev;
        if (b->prev)
            b->prev->next = b;
        else
            b->seg->head = b;
    } else {
        b->next = n->next;
        if (b->next)
            b->next->prev = b;
    }
    size = n->size;
    b->size += size;
    free(n);
    return size;
}

/* free() + free_block() */
void wa_free(wa_allocator *a, wa_block *b)
{
    wa_device *d;
    wa_pool *pool;
    int64_t split_blocks = 0, split_bytes = 0;
    uint64_t size, requested, merged;

    if (!b)
        return;
    d = &a->dev[b->seg->device];
    pool = pool_of(d, b);
    size = b->size;
    requested = b->requested;
    b->allocated = false;
    stat_sub(&d->stats.allocation, 1);
    stat_sub(&d->stats.allocated_bytes, size);
    if (b->counted_oversize)
        stat_sub(&d->stats.oversize_allocations, 1);
    b->counted_oversize = false;

    if ((merged = merge(d, b, b->prev))) {
        split_blocks--;
        split_bytes -= (int64_t)merged;
    }
    if ((merged = merge(d, b, b->next))) {
        split_blocks--;
        split_bytes -= (int64_t)merged;
    }
    b->requested = 0;
    b->gc_base = pool->get_free_calls;
    wa__pool_insert(pool, b);
    if (is_split(b)) {
        split_blocks++;
        split_bytes += (int64_t)b->size;
    }
    if (split_blocks > 0)
        stat_add(&d->stats.inactive_split, (uint64_t)split_blocks);
    else
        stat_sub(&d->stats.inactive_split, (uint64_t)-split_blocks);
    if (split_bytes > 0)
        stat_add(&d->stats.inactive_split_bytes, (uint64_t)split_bytes);
    else
        stat_sub(&d->stats.inactive_split_bytes, (uint64_t)-split_bytes);
    stat_sub(&d->stats.active, 1);
    stat_sub(&d->stats.active_bytes, size);
    stat_sub(&d->stats.requested_bytes, requested);
}

void wa_empty_cache(wa_allocator *a, int device)
{
    for (int i = 0; i < a->n_devices; i++)
        if (device < 0 || device == i)
            release_cached(a, i);
}

void wa_block_region(const wa_block *b, wa_region *out)
{
    out->device = b->seg->device;
    out->addr = b->addr;
    out->size = b->size;
    out->requested = b->requested;
    out->segment_id = b->seg->id;
    out->segment_addr = b->seg->mem.addr;
    out->segment_size = b->seg->size;
    out->offset = b->addr - b->seg->mem.addr;
    out->mem = &b->seg->mem;
}

/* ---- life cycle -------------------------------------------------------- */

int wa_create(wa_backend *backend, const char *conf_text, wa_allocator **out, wd_error *err)
{
    wa_allocator *a;
    wa_config conf;
    int rc;

    if ((rc = wa_config_parse(conf_text, NULL, WA_CONF_OVERLAY, &conf, err)))
        return rc;
    if (!(a = calloc(1, sizeof *a)) || !(a->dev = calloc((size_t)backend->n_devices, sizeof *a->dev))) {
        free(a);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    a->backend = backend;
    a->n_devices = backend->n_devices;
    a->next_segment_id = 1;
    for (int i = 0; i < a->n_devices; i++) {
        wa_device_info info;
        a->dev[i].small.small = true;
        if (backend->describe(backend, i, &info) == 0)
            a->dev[i].limit = info.capacity;
        a->dev[i].stats.capacity = a->dev[i].limit;
    }
    if ((rc = wa_set_config(a, &conf))) {
        wd_error_set(err, rc, "allocator configuration \"%s\" is not supported by the %s backend",
                     conf_text, backend->name);
        wa_destroy(a);
        return rc;
    }
    *out = a;
    return 0;
}

void wa_destroy(wa_allocator *a)
{
    if (!a)
        return;
    for (int i = 0; i < a->n_devices; i++) {
        /* Free what is still handed out (merging may free neighbours, so
         * start the segment again after each), then give every segment back. */
        for (wa_segment *seg = a->dev[i].segments; seg; seg = seg->next)
            for (wa_block *b = seg->head; b;)
                if (b->allocated) {
                    wa_free(a, b);
                    b = seg->head;
                } else {
                    b = b->next;
                }
        release_cached(a, i);
    }
    free(a->dev);
    free(a->stack);
    free(a);
}

int wa_device_count(const wa_allocator *a)
{
    return a->n_devices;
}

wa_backend *wa_get_backend(const wa_allocator *a)
{
    return a->backend;
}

/* ---- configuration and the policy stack -------------------------------- */

const wa_config *wa_get_config(const wa_allocator *a)
{
    return &a->conf;
}

/* A change of max_split_size leaves cached blocks where they are: from then
 * on, a cached block of at least the new max_split_size is oversize (never
 * split, reused only within max_non_split_rounding of its size), and a block
 * under it may be split again. The oversize_* statistics count what was
 * oversize when it was made, so they never go negative across changes. */
int wa_set_config(wa_allocator *a, const wa_config *conf)
{
    if (conf->expandable_segments)
        return -ENOTSUP; /* no backend built so far can grow a segment */
    a->conf = *conf;
    return 0;
}

int wa_policy_push(wa_allocator *a, const char *conf_text, wd_error *err)
{
    wa_config next;
    int rc;

    if ((rc = wa_config_parse(conf_text, &a->conf, WA_CONF_OVERLAY, &next, err)))
        return rc;
    if (a->depth == a->stack_cap) {
        size_t cap = a->stack_cap ? a->stack_cap * 2 : 4;
        wa_config *s = realloc(a->stack, cap * sizeof *s);
        if (!s)
            return wd_error_set(err, -ENOMEM, "out of host memory");
        a->stack = s;
        a->stack_cap = cap;
    }
    a->stack[a->depth] = a->conf;
    if ((rc = wa_set_config(a, &next)))
        return wd_error_set(err, rc, "allocator policy \"%s\" is not supported by the %s backend",
                            conf_text, a->backend->name);
    a->depth++;
    return 0;
}

int wa_policy_pop(wa_allocator *a)
{
    if (!a->depth)
        return -ENOENT;
    a->conf = a->stack[--a->depth];
    return 0;
}

size_t wa_policy_depth(const wa_allocator *a)
{
    return a->depth;
}

/* ---- statistics and snapshots ------------------------------------------ */

int wa_get_stats(const wa_allocator *a, int device, wa_stats *out)
{
    const wa_device *d;
    const wa_block *big, *small;
    uint64_t cached;

    if (device < 0 || device >= a->n_devices)
        return -ENODEV;
    d = &a->dev[device];
    *out = d->stats;
    big = wa__pool_max(&d->large);
    small = wa__pool_max(&d->small);
    out->largest_free_block = big ? big->size : 0;
    if (small && small->size > out->largest_free_block)
        out->largest_free_block = small->size;
    cached = (uint64_t)(d->stats.reserved_bytes.current - d->stats.allocated_bytes.current);
    out->fragmentation = cached ? 1.0 - (double)out->largest_free_block / (double)cached : 0.0;
    return 0;
}

void wa_reset_peaks(wa_allocator *a, int device)
{
    for (int i = 0; i < a->n_devices; i++) {
        if (device >= 0 && device != i)
            continue;
#define X(name, what) a->dev[i].stats.name.peak = a->dev[i].stats.name.current;
        WA_STAT_LIST(X)
#undef X
    }
}

static int cmp_segment(const void *x, const void *y)
{
    const wa_snap_segment *p = x, *q = y;
    return p->addr < q->addr ? -1 : p->addr > q->addr;
}

int wa_snapshot(const wa_allocator *a, int device, wa_snap_segment **segs, size_t *n)
{
    const wa_segment *seg;
    wa_snap_segment *out;
    size_t count = 0, i = 0;

    if (device < 0 || device >= a->n_devices)
        return -ENODEV;
    for (seg = a->dev[device].segments; seg; seg = seg->next)
        count++;
    if (!(out = calloc(count ? count : 1, sizeof *out)))
        return -ENOMEM;
    for (seg = a->dev[device].segments; seg; seg = seg->next, i++) {
        size_t nb = 0, j = 0;
        for (const wa_block *b = seg->head; b; b = b->next)
            nb++;
        out[i].id = seg->id;
        out[i].addr = seg->mem.addr;
        out[i].size = seg->size;
        out[i].small_pool = seg->small;
        out[i].n_blocks = nb;
        if (!(out[i].blocks = calloc(nb, sizeof *out[i].blocks))) {
            wa_snapshot_free(out, i);
            return -ENOMEM;
        }
        for (const wa_block *b = seg->head; b; b = b->next, j++) {
            out[i].blocks[j].addr = b->addr;
            out[i].blocks[j].size = b->size;
            out[i].blocks[j].requested = b->requested;
            out[i].blocks[j].allocated = b->allocated;
        }
    }
    qsort(out, count, sizeof *out, cmp_segment);
    *segs = out;
    *n = count;
    return 0;
}

void wa_snapshot_free(wa_snap_segment *segs, size_t n)
{
    if (!segs)
        return;
    for (size_t i = 0; i < n; i++)
        free(segs[i].blocks);
    free(segs);
}

/* ---- invariants -------------------------------------------------------- */

struct tree_check {
    const wa_block *last;
    size_t n;
    bool ordered;
};

static void tree_check_one(wa_block *b, void *ctx)
{
    struct tree_check *c = ctx;

    if (c->last && !(c->last->size < b->size || (c->last->size == b->size && c->last->addr < b->addr)))
        c->ordered = false;
    if (b->allocated)
        c->ordered = false;
    c->last = b;
    c->n++;
}

int wa_check(const wa_allocator *a, wd_error *err)
{
    for (int i = 0; i < a->n_devices; i++) {
        const wa_device *d = &a->dev[i];
        wa_stats recount;
        size_t free_blocks = 0;
        struct tree_check tc;

        memset(&recount, 0, sizeof recount);
        for (const wa_segment *seg = d->segments; seg; seg = seg->next) {
            uint64_t at = seg->mem.addr;
            const wa_block *prev = NULL;
            if (!seg->head || seg->head->prev)
                return wd_error_set(err, -EFAULT, "device %d segment %u: bad head block", i, seg->id);
            for (const wa_block *b = seg->head; b; prev = b, b = b->next) {
                if (b->seg != seg || b->prev != prev)
                    return wd_error_set(err, -EFAULT, "device %d segment %u: broken block links", i, seg->id);
                if (b->addr != at || b->size == 0)
                    return wd_error_set(err, -EFAULT, "device %d segment %u: block at %#" PRIx64
                                        " does not follow the previous one (expected %#" PRIx64 ")",
                                        i, seg->id, b->addr, at);
                if (!b->allocated && prev && !prev->allocated)
                    return wd_error_set(err, -EFAULT, "device %d segment %u: free neighbours at %#" PRIx64
                                        " not merged", i, seg->id, b->addr);
                at += b->size;
                if (b->allocated) {
                    recount.allocation.current++;
                    recount.allocated_bytes.current += (int64_t)b->size;
                    recount.requested_bytes.current += (int64_t)b->requested;
                    if (b->counted_oversize)
                        recount.oversize_allocations.current++;
                } else {
                    free_blocks++;
                    if (seg->head != b || b->next) {
                        recount.inactive_split.current++;
                        recount.inactive_split_bytes.current += (int64_t)b->size;
                    }
                }
            }
            if (at != seg->mem.addr + seg->size)
                return wd_error_set(err, -EFAULT, "device %d segment %u: blocks cover %" PRIu64 " of %" PRIu64
                                    " bytes", i, seg->id, at - seg->mem.addr, seg->size);
            recount.segment.current++;
            recount.reserved_bytes.current += (int64_t)seg->size;
            if (seg->counted_oversize)
                recount.oversize_segments.current++;
        }
        recount.active = recount.allocation;
        recount.active_bytes = recount.allocated_bytes;
#define CHECK(name, what)                                                                            \
        if (recount.name.current != d->stats.name.current)                                       \
            return wd_error_set(err, -EFAULT, "device %d: statistic " #name " is %" PRId64       \
                                " but a recount gives %" PRId64, i, d->stats.name.current,       \
                                recount.name.current);                                           \
        if (d->stats.name.peak < d->stats.name.current)                                          \
            return wd_error_set(err, -EFAULT, "device %d: " #name " peak below current", i);
        WA_STAT_LIST(CHECK)
#undef CHECK
        if (free_blocks != d->small.count + d->large.count)
            return wd_error_set(err, -EFAULT, "device %d: %zu free blocks but the pools hold %zu", i,
                                free_blocks, d->small.count + d->large.count);
        for (int p = 0; p < 2; p++) {
            const wa_pool *pool = p ? &d->large : &d->small;
            memset(&tc, 0, sizeof tc);
            tc.ordered = true;
            wa__pool_each(pool, tree_check_one, &tc);
            if (!tc.ordered || tc.n != pool->count)
                return wd_error_set(err, -EFAULT, "device %d: %s pool out of order or miscounted", i,
                                    p ? "large" : "small");
        }
        if (d->limit && (uint64_t)d->stats.reserved_bytes.current > d->limit)
            return wd_error_set(err, -EFAULT, "device %d: reserved over capacity", i);
    }
    return 0;
}
