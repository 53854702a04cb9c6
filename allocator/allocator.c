/* The caching allocator. The rules follow PyTorch's DeviceCachingAllocator
 * (c10/cuda/CUDACachingAllocator.cpp); each carries a pointer to the function
 * that does the same there. Free blocks are kept per arena (stream and tag,
 * internal.h); the daemon uses the common one only. */
#include "allocator/internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"
#include "common/size.h"
#include "common/fault.h"

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


/* ---- blocks ------------------------------------------------------------ */

/* The size a block of an expandable segment could grow to without moving. */
static uint64_t expandable_size(const wa_block *b)
{
    return b->size + (b->next && !b->next->mapped ? b->next->size : 0);
}

/* get_free_block(): best fit, with two exceptions. An oversize block only
 * serves a request that is itself oversize and within max_non_split_rounding
 * of it. Blocks of expandable segments are weighed by what they could grow
 * to, and skipped while expandable_segments is off. */
static wa_block *take_free_block(wa_allocator *a, wa_pool *pool, uint64_t size)
{
    wa_block *b;

    if (a->conf.garbage_collection_threshold > 0)
        pool->get_free_calls++;
    b = wa__tree_lower_bound(&pool->blocks, size, 0);
    if (b && b->seg->expandable) {
        if (a->conf.expandable_segments) {
            wa_block *n;
            while (b->seg->expandable && (n = wa__tree_next(&pool->blocks, b)) &&
                   expandable_size(n) < expandable_size(b))
                b = n;
        } else {
            do
                b = wa__tree_next(&pool->blocks, b);
            while (b && b->seg->expandable);
        }
    }
    if (!b)
        return NULL;
    if (size < a->conf.max_split_size && b->size >= a->conf.max_split_size)
        return NULL;
    if (size >= a->conf.max_split_size && b->size >= size + a->conf.max_non_split_rounding)
        return NULL;
    wa__tree_erase(&pool->blocks, b);
    return b;
}

/* should_split(): note that PyTorch asks whether expandable segments are on,
 * not whether this block is in one. */
static bool should_split(const wa_allocator *a, const wa_block *b, uint64_t size)
{
    uint64_t remaining = b->size - size;

    if (b->seg->small || a->conf.expandable_segments)
        return remaining >= WA_MIN_BLOCK_SIZE;
    return size < a->conf.max_split_size && remaining > WA_SMALL_SIZE;
}

/* alloc_found_block(): b is out of its pool; split off the remainder if the
 * rules say so (spare is the bookkeeping for the front part) and hand out
 * the front. inactive_split counts classic segments only, as in PyTorch. */
static wa_block *hand_out(wa_allocator *a, wa_device *d, wa_block *b, uint64_t size, uint64_t requested,
                          wa_block *spare)
{
    wa_pool *pool = wa__pool_of(b);
    bool already_split = wa__is_split(b), counts = !b->seg->expandable;

    if (spare) {
        /* spare becomes the front part; b keeps the remainder, as in PyTorch. */
        *spare = (wa_block){.addr = b->addr, .size = size, .seg = b->seg, .mapped = true};
        wa__link_before(b, spare);
        b->addr += size;
        b->size -= size;
        b->requested = 0;
        b->gc_base = pool->get_free_calls;
        wa__tree_insert(&pool->blocks, b);
        if (counts && already_split) {
            wa__stat_sub(&d->stats.inactive_split_bytes, size);
        } else if (counts) {
            wa__stat_add(&d->stats.inactive_split_bytes, b->size);
            wa__stat_add(&d->stats.inactive_split, 1);
        }
        b = spare;
    } else if (counts && already_split) {
        wa__stat_sub(&d->stats.inactive_split_bytes, b->size);
        wa__stat_sub(&d->stats.inactive_split, 1);
    }
    wa__count_handed_out(a, d, b, requested);
    return b;
}

void wa__count_handed_out(const wa_allocator *a, wa_device *d, wa_block *b, uint64_t requested)
{
    b->allocated = true;
    b->requested = requested;
    wa__stat_add(&d->stats.allocation, 1);
    wa__stat_add(&d->stats.allocated_bytes, b->size);
    wa__stat_add(&d->stats.active, 1);
    wa__stat_add(&d->stats.active_bytes, b->size);
    wa__stat_add(&d->stats.requested_bytes, requested);
    b->counted_oversize = b->size >= a->conf.max_split_size;
    if (b->counted_oversize)
        wa__stat_add(&d->stats.oversize_allocations, 1);
}

/* expandable_page_align (weightd): a block of a page or less that would
 * straddle a page boundary starts at the boundary instead, when the free
 * block is long enough; the bytes skipped stay a free block. Freeing the
 * block then frees a whole page, which an expandable segment gives back,
 * where a straddling block would pin two half-used pages. */
static void keep_in_one_page(wa_pool *pool, wa_block *b, uint64_t size)
{
    uint64_t page = b->seg->page, off = (b->addr - b->seg->mem.addr) % page;
    uint64_t skip = off && off + size > page ? page - off : 0;
    wa_block *front;

    if (!skip || skip + size > b->size || !(front = wd_calloc(1, sizeof *front)))
        return; /* no room (or no memory) to move: it straddles, as in PyTorch */
    *front = (wa_block){.addr = b->addr, .size = skip, .seg = b->seg, .mapped = true};
    wa__link_before(b, front);
    b->addr += skip;
    b->size -= skip;
    front->gc_base = pool->get_free_calls;
    wa__tree_insert(&pool->blocks, front);
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

/* alloc_block(): new memory from the device, refused before asking when it
 * would pass the capacity (PyTorch's memory-fraction check, which counts the
 * classic segment size even on the expandable path). */
static int take_new_memory(wa_allocator *a, int device, wa_arena *ar, wa_pool *pool, uint64_t size,
                           uint64_t seg_size, wa_block **out, wd_error *err)
{
    wa_device *d = &a->dev[device];

    if (d->limit && (uint64_t)d->stats.reserved_bytes.current + seg_size > d->limit)
        return -ENOMEM;
    if (a->conf.expandable_segments)
        return wa__expandable_alloc(a, device, ar, pool, size, out, err);
    return wa__segment_new(a, device, ar, seg_size, pool->small, out, err);
}

static void arena_init(wa_arena *ar, uint64_t stream, uint32_t tag)
{
    memset(ar, 0, sizeof *ar);
    ar->small.small = true;
    ar->small.unmapped.by_addr = ar->large.unmapped.by_addr = true;
    ar->stream = stream;
    ar->tag = tag;
}

/* The arena of (stream, tag) on d, made on first use; a new one of a
 * sleeping tag sleeps too. */
static wa_arena *arena_for(wa_allocator *a, wa_device *d, uint64_t stream, uint32_t tag)
{
    wa_arena *ar;

    for (ar = &d->common; ar; ar = ar->next)
        if (ar->stream == stream && ar->tag == tag)
            return ar;
    if (!(ar = wd_malloc(sizeof *ar)))
        return NULL;
    arena_init(ar, stream, tag);
    ar->asleep = wa_tag_asleep(a, tag);
    ar->next = d->common.next;
    d->common.next = ar;
    return ar;
}

/* malloc() */
int wa_malloc(wa_allocator *a, int device, uint64_t requested, wa_block **out, wd_error *err)
{
    return wa_malloc_in(a, device, 0, 0, requested, out, err);
}

int wa_malloc_in(wa_allocator *a, int device, uint64_t stream, uint32_t tag, uint64_t requested, wa_block **out,
                 wd_error *err)
{
    wa_device *d;
    wa_arena *ar;
    wa_pool *pool;
    wa_block *b, *spare = NULL;
    uint64_t size, seg_size;
    int rc;

    if (device < 0 || device >= a->n_devices)
        return wd_error_set(err, -ENODEV, "no device %d (this daemon has %d)", device, a->n_devices);
    if (requested > (UINT64_MAX >> 2))
        return wd_error_set(err, -EFBIG, "allocation of %" PRIu64 " bytes is too large", requested);
    d = &a->dev[device];
    if (!(ar = arena_for(a, d, stream, tag)))
        return wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
    if (ar->asleep)
        return wd_error_set(err, -EAGAIN, "tag %" PRIu32 " is asleep: wake it before allocating under it", tag);
    size = round_size(&a->conf, requested);
    pool = size <= WA_SMALL_SIZE ? &ar->small : &ar->large;
    seg_size = segment_size_for(size);

    b = take_free_block(a, pool, size);
    if (!b) {
        if (a->conf.garbage_collection_threshold > 0 && d->limit)
            wa__garbage_collect(a, d);
        rc = take_new_memory(a, device, ar, pool, size, seg_size, &b, err);
        if (rc == -ENOMEM && wa__release_available(a, pool, size))
            rc = take_new_memory(a, device, ar, pool, size, seg_size, &b, err);
        if (rc == -ENOMEM) {
            wa__release_cached(a, device);
            d->stats.num_alloc_retries++;
            rc = take_new_memory(a, device, ar, pool, size, seg_size, &b, err);
        }
        if (rc == -ENOMEM) {
            d->stats.num_ooms++;
            oom_message(a, device, requested, seg_size, err);
            return -ENOMEM;
        }
        if (rc)
            return rc;
    }
    if (a->conf.expandable_page_align && b->seg->expandable && size <= b->seg->page)
        keep_in_one_page(pool, b, size);
    if (should_split(a, b, size) && !(spare = wd_calloc(1, sizeof *spare))) {
        /* Put the block back untouched so nothing is half done. */
        b->gc_base = pool->get_free_calls;
        wa__tree_insert(&pool->blocks, b);
        return wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
    }
    *out = hand_out(a, d, b, size, requested, spare);
    return 0;
}

uint64_t wa__merge(wa_block *b, wa_block *n)
{
    wa_pool *pool;
    uint64_t size;

    if (!n || n->allocated || n->mapped != b->mapped)
        return 0;
    pool = wa__pool_of(n);
    wa__tree_erase(n->mapped ? &pool->blocks : &pool->unmapped, n);
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
    pool = wa__pool_of(b);
    size = b->size;
    requested = b->requested;
    b->allocated = false;
    wa__stat_sub(&d->stats.allocation, 1);
    wa__stat_sub(&d->stats.allocated_bytes, size);
    if (b->counted_oversize)
        wa__stat_sub(&d->stats.oversize_allocations, 1);
    b->counted_oversize = false;

    if ((merged = wa__merge(b, b->prev))) {
        split_blocks--;
        split_bytes -= (int64_t)merged;
    }
    if ((merged = wa__merge(b, b->next))) {
        split_blocks--;
        split_bytes -= (int64_t)merged;
    }
    b->requested = 0;
    b->gc_base = pool->get_free_calls;
    wa__tree_insert(&pool->blocks, b);
    if (wa__is_split(b)) {
        split_blocks++;
        split_bytes += (int64_t)b->size;
    }
    if (!b->seg->expandable) {
        if (split_blocks > 0)
            wa__stat_add(&d->stats.inactive_split, (uint64_t)split_blocks);
        else
            wa__stat_sub(&d->stats.inactive_split, (uint64_t)-split_blocks);
        if (split_bytes > 0)
            wa__stat_add(&d->stats.inactive_split_bytes, (uint64_t)split_bytes);
        else
            wa__stat_sub(&d->stats.inactive_split_bytes, (uint64_t)-split_bytes);
    }
    wa__stat_sub(&d->stats.active, 1);
    wa__stat_sub(&d->stats.active_bytes, size);
    wa__stat_sub(&d->stats.requested_bytes, requested);
    /* Coalesced allocations are not cached: reused by smaller requests, a
     * large one would be pinned whole by a few live blocks. */
    if (b->seg->expandable && b->seg->coalesce && !b->seg->asleep)
        wa__release_free_chunks(a, b);
}

void wa_empty_cache(wa_allocator *a, int device)
{
    for (int i = 0; i < a->n_devices; i++)
        if (device < 0 || device == i)
            wa__release_cached(a, i);
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

size_t wa_block_backing(const wa_block *b, const wa_mem **out, size_t max)
{
    const wa_segment *seg = b->seg;
    size_t n = 0, i, last;

    if (!seg->expandable) {
        if (max)
            out[0] = &seg->mem;
        return 1;
    }
    /* A block of an expandable segment lies on mapped pages; each page
     * belongs to the allocation that starts at chunk[page]. */
    i = (size_t)((b->addr - seg->mem.addr) / seg->page);
    last = (size_t)((b->addr + b->size - 1 - seg->mem.addr) / seg->page);
    while (i <= last) {
        size_t head = seg->chunk[i];
        if (n < max)
            out[n] = &seg->pages[head];
        n++;
        i = head + (size_t)(seg->pages[head].size / seg->page);
    }
    return n;
}

/* ---- life cycle -------------------------------------------------------- */

int wa_create(wa_backend *backend, const char *conf_text, wa_allocator **out, wd_error *err)
{
    wa_allocator *a;
    wa_config conf;
    int rc;

    if ((rc = wa_config_parse(conf_text, NULL, WA_CONF_OVERLAY, &conf, err)))
        return rc;
    if (!(a = wd_calloc(1, sizeof *a)) || !(a->dev = wd_calloc((size_t)backend->n_devices, sizeof *a->dev))) {
        free(a);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    a->backend = backend;
    a->n_devices = backend->n_devices;
    a->next_segment_id = 1;
    for (int i = 0; i < a->n_devices; i++) {
        wa_device_info info;
        arena_init(&a->dev[i].common, 0, 0);
        if (backend->describe(backend, i, &info) == 0)
            a->dev[i].limit = info.capacity;
        a->dev[i].stats.capacity = a->dev[i].limit;
    }
    if ((rc = wa_set_config(a, &conf))) {
        wd_error_set(err, rc, "allocator configuration \"%s\" is not supported by the %s backend", conf_text,
                     backend->name);
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
    wa__sleep_forget(a);
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
        wa__release_cached(a, i);
        for (wa_arena *ar = a->dev[i].common.next, *next; ar; ar = next) {
            next = ar->next;
            free(ar);
        }
    }
    free(a->tags);
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
 * oversize when it was made, so they never go negative across changes.
 * Turning expandable_segments off leaves expandable segments in place; their
 * free blocks are no longer handed out (as PyTorch does) until it is on again. */
int wa_set_config(wa_allocator *a, const wa_config *conf)
{
    if (conf->expandable_segments && !a->backend->va_reserve)
        return -ENOTSUP;
    a->conf = *conf;
    return 0;
}

int wa_policy_push(wa_allocator *a, const char *conf_text, wd_error *err)
{
    wa_config next;
    int rc;

    if ((rc = wa_config_parse(conf_text, &a->conf, WA_CONF_OVERLAY, &next, err)))
        return rc;
    if (WD_GROW(a->stack, a->stack_cap, a->depth + 1, 4))
        return wd_error_set(err, -ENOMEM, "out of host memory");
    a->stack[a->depth] = a->conf;
    if ((rc = wa_set_config(a, &next)))
        return wd_error_set(err, rc, "allocator policy \"%s\" is not supported by the %s backend", conf_text,
                            a->backend->name);
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
