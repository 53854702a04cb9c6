/* Taking memory from the device and giving it back: classic segments (one
 * backend allocation each, PyTorch's cudaMalloc path) and expandable segments
 * (an address range with pages mapped in and out, PyTorch's
 * expandable_segments:True path). */
#include "allocator/internal.h"
#include "common/fault.h"

#include <stdlib.h>
#include <string.h>

/* The address space of an expandable segment: 1 1/8 of the device, as
 * PyTorch reserves; capped for backends with no real capacity (fake). */
#define VA_LIMIT (1ULL << 46)

static void segment_link(wa_device *d, wa_segment *seg)
{
    seg->prev = NULL;
    seg->next = d->segments;
    if (d->segments)
        d->segments->prev = seg;
    d->segments = seg;
}

static void segment_unlink(wa_device *d, wa_segment *seg)
{
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        d->segments = seg->next;
    if (seg->next)
        seg->next->prev = seg->prev;
}

/* ---- classic segments ------------------------------------------------------ */

/* A new classic segment in the statistics: its bytes are reserved at once. */
static void count_classic_segment(const wa_allocator *a, wa_device *d, wa_segment *seg)
{
    wa__stat_add(&d->stats.segment, 1);
    wa__stat_add(&d->stats.reserved_bytes, seg->size);
    if (seg->size >= a->conf.max_split_size) {
        seg->counted_oversize = true;
        wa__stat_add(&d->stats.oversize_segments, 1);
    }
    d->stats.num_device_alloc++;
}

typedef int (*segment_memory_fn)(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err);

/* A linked segment of `size` bytes whose memory comes from get (the
 * backend's seg_alloc or va_reserve), with one block over all of it. */
static int segment_create(wa_allocator *a, int device, wa_arena *ar, uint64_t size, bool small,
                          segment_memory_fn get, wa_block **out, wd_error *err)
{
    wa_segment *seg = wd_calloc(1, sizeof *seg);
    wa_block *b = wd_calloc(1, sizeof *b);
    int rc;

    if (!seg || !b) {
        rc = wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
        goto fail;
    }
    if ((rc = get(a->backend, device, size, &seg->mem, err)))
        goto fail;
    seg->size = size;
    seg->device = device;
    seg->small = small;
    seg->arena = ar;
    seg->id = a->next_segment_id++;
    seg->head = b;
    segment_link(&a->dev[device], seg);
    b->addr = seg->mem.addr;
    b->size = size;
    b->seg = seg;
    *out = b;
    return 0;
fail:
    free(seg);
    free(b);
    return rc;
}

int wa__segment_new(wa_allocator *a, int device, wa_arena *ar, uint64_t size, bool small, wa_block **out,
                    wd_error *err)
{
    wa_device *d = &a->dev[device];
    wa_block *b;
    int rc;

    if ((rc = segment_create(a, device, ar, size, small, a->backend->seg_alloc, &b, err)))
        return rc;
    b->mapped = true;
    count_classic_segment(a, d, b->seg);
    *out = b;
    return 0;
}

/* release_block(): b is a free, unsplit block of a classic segment, in its pool. */
static void segment_release(wa_allocator *a, wa_block *b)
{
    wa_segment *seg = b->seg;
    wa_device *d = &a->dev[seg->device];

    wa__tree_erase(&wa__pool_of(b)->blocks, b);
    a->backend->seg_free(a->backend, seg->device, &seg->mem);
    wa__stat_sub(&d->stats.segment, 1);
    wa__stat_sub(&d->stats.reserved_bytes, seg->size);
    if (seg->counted_oversize)
        wa__stat_sub(&d->stats.oversize_segments, 1);
    d->stats.num_device_free++;
    segment_unlink(d, seg);
    free(seg);
    free(b);
}

/* ---- expandable segments --------------------------------------------------- */

/* PyTorch maps 2 MiB pages in the small pool and 20 MiB pages (kLargeBuffer)
 * in the large pool (ExpandableSegment's segment_size); expandable_page_mb
 * sets the large pool's. A segment keeps the page size it was made with. */
static uint64_t page_size(const wa_allocator *a, bool small)
{
    return small ? WA_SMALL_BUFFER : a->conf.expandable_page;
}

uint64_t wa__mapped_bytes(const wa_segment *seg)
{
    uint64_t bytes = 0;

    for (size_t i = 0; i < seg->n_pages; i++)
        bytes += seg->pages[i].size;
    return bytes;
}

/* A new expandable segment: its whole address range one unmapped block. */
static int expandable_new(wa_allocator *a, int device, wa_arena *ar, wa_pool *pool, wa_block **out,
                          wd_error *err)
{
    wa_device *d = &a->dev[device];
    uint64_t page = page_size(a, pool->small);
    uint64_t cap = d->limit && d->limit < VA_LIMIT ? d->limit : VA_LIMIT;
    uint64_t size = (cap + cap / 8 + page - 1) / page * page;
    wa_block *b;
    int rc;

    if ((rc = segment_create(a, device, ar, size, pool->small, a->backend->va_reserve, &b, err)))
        return rc;
    b->seg->expandable = true;
    b->seg->page = page;
    b->seg->coalesce = a->conf.expandable_coalesce;
    wa__tree_insert(&pool->unmapped, b);
    *out = b;
    return 0;
}

static void expandable_release(wa_allocator *a, wa_pool *pool, wa_block *b)
{
    wa_segment *seg = b->seg;

    wa__tree_erase(&pool->unmapped, b);
    a->backend->va_release(a->backend, seg->device, &seg->mem);
    segment_unlink(&a->dev[seg->device], seg);
    free(seg->pages);
    free(seg->chunk);
    free(seg);
    free(b);
}

static bool allocatable(const wa_block *b)
{
    return b && !b->allocated;
}

/* find_expandable_block(): the lowest address where `size` bytes of free or
 * unmapped blocks follow one another; a new segment when there is none. */
static int find_expandable(wa_allocator *a, int device, wa_arena *ar, wa_pool *pool, uint64_t size,
                           wa_block **out, wd_error *err)
{
    for (wa_block *u = wa__tree_lower_bound(&pool->unmapped, 0, 0); u; u = wa__tree_next(&pool->unmapped, u)) {
        wa_block *c = allocatable(u->prev) ? u->prev : u;
        uint64_t bytes = 0;
        for (wa_block *b = c; b && bytes < size && allocatable(b); b = b->next)
            bytes += b->size;
        if (bytes >= size) {
            *out = c;
            return 0;
        }
    }
    return expandable_new(a, device, ar, pool, out, err);
}

/* Room for `last` pages in a segment's page tables. */
static int grow_pages(wa_segment *seg, size_t last, wd_error *err)
{
    wa_mem *pages;
    uint32_t *chunk;

    if (last <= seg->n_pages)
        return 0;
    if (!(pages = wd_realloc(seg->pages, last * sizeof *pages)))
        return wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
    seg->pages = pages;
    if (!(chunk = wd_realloc(seg->chunk, last * sizeof *chunk)))
        return wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
    seg->chunk = chunk;
    memset(pages + seg->n_pages, 0, (last - seg->n_pages) * sizeof *pages);
    for (size_t i = seg->n_pages; i < last; i++)
        chunk[i] = WA_UNMAPPED;
    seg->n_pages = last;
    return 0;
}

/* One physical allocation for pages [first, last). */
static int map_pages(wa_allocator *a, wa_segment *seg, size_t first, size_t last, wd_error *err)
{
    int rc = a->backend->page_map(a->backend, seg->device, &seg->mem, (uint64_t)first * seg->page,
                                  (uint64_t)(last - first) * seg->page, &seg->pages[first], err);
    if (rc)
        return rc;
    for (size_t i = first; i < last; i++)
        seg->chunk[i] = (uint32_t)first;
    return 0;
}

static void unmap_pages(wa_allocator *a, wa_segment *seg, size_t head)
{
    size_t n = (size_t)(seg->pages[head].size / seg->page);

    a->backend->page_unmap(a->backend, seg->device, &seg->mem, &seg->pages[head]);
    memset(&seg->pages[head], 0, sizeof seg->pages[head]);
    for (size_t i = head; i < head + n; i++)
        seg->chunk[i] = WA_UNMAPPED;
}

/* map_block(): maps the pages under the first `size` bytes of the unmapped
 * block b, page by page (PyTorch) or as one allocation (expandable_coalesce);
 * the mapped part merges with free neighbours and joins the pool. */
static int map_block(wa_allocator *a, wa_pool *pool, wa_block *b, uint64_t size, wd_error *err)
{
    wa_segment *seg = b->seg;
    wa_device *d = &a->dev[seg->device];
    size_t first = (size_t)((b->addr - seg->mem.addr) / seg->page);
    size_t last = (size_t)((b->addr - seg->mem.addr + size + seg->page - 1) / seg->page);
    uint64_t mapped = (uint64_t)(last - first) * seg->page;
    wa_block *rest = NULL;
    int rc = 0;

    if (mapped < b->size && !(rest = wd_calloc(1, sizeof *rest)))
        return wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
    if ((rc = grow_pages(seg, last, err))) {
        free(rest);
        return rc;
    }
    if (seg->coalesce) {
        /* The pages the request fills are one allocation; a last page it
         * fills only in part is one of its own, because the next block will
         * share it, and it must not pin the rest when this block is freed. */
        size_t full = (b->addr - seg->mem.addr + size) % seg->page && last - first > 1 ? last - 1 : last;
        if (!(rc = map_pages(a, seg, first, full, err)) && full < last && (rc = map_pages(a, seg, full, last, err)))
            unmap_pages(a, seg, first);
    } else {
        for (size_t i = first; i < last && !rc; i++)
            if ((rc = map_pages(a, seg, i, i + 1, err)))
                while (i-- > first) /* all or nothing */
                    unmap_pages(a, seg, i);
    }
    if (rc) {
        free(rest);
        return rc;
    }
    wa__tree_erase(&pool->unmapped, b);
    b->mapped = true;
    if (rest) {
        rest->addr = b->addr + mapped;
        rest->size = b->size - mapped;
        rest->seg = seg;
        wa__link_after(b, rest);
        b->size = mapped;
        wa__tree_insert(&pool->unmapped, rest);
    }
    wa__merge(b, b->prev);
    wa__merge(b, b->next);
    b->gc_base = pool->get_free_calls;
    wa__tree_insert(&pool->blocks, b);
    wa__stat_add(&d->stats.reserved_bytes, mapped);
    d->stats.num_device_alloc++;
    return 0;
}

int wa__expandable_alloc(wa_allocator *a, int device, wa_arena *ar, wa_pool *pool, uint64_t size, wa_block **out,
                         wd_error *err)
{
    wa_block *c = NULL;
    int rc;

    if ((rc = find_expandable(a, device, ar, pool, size, &c, err)))
        return rc;
    if (!c->mapped && (rc = map_block(a, pool, c, c->size < size ? c->size : size, err)))
        return rc;
    /* c is free and mapped now; map what follows until it is large enough.
     * Each map merges c into the block it maps. */
    while (c->size < size) {
        wa_block *n = c->next;
        uint64_t want = size - c->size;
        if ((rc = map_block(a, pool, n, want < n->size ? want : n->size, err)))
            return rc;
        c = n;
    }
    wa__tree_erase(&pool->blocks, c);
    *out = c;
    return 0;
}

/* Gives back pages [first, last) under the free mapped block b, which spans
 * them (whole physical allocations only). b becomes the unmapped range and
 * merges with unmapped neighbours; what was before and after it stays
 * mapped and free. Returns the unmapped block, and in *after the free block
 * after it (or NULL). */
static wa_block *carve(wa_allocator *a, wa_pool *pool, wa_block *b, size_t first, size_t last, wa_block **after)
{
    wa_segment *seg = b->seg;
    wa_device *d = &a->dev[seg->device];
    uint64_t start = seg->mem.addr + (uint64_t)first * seg->page, size = (uint64_t)(last - first) * seg->page;
    uint64_t before_len = start - b->addr, after_len = b->addr + b->size - (start + size);
    wa_block *front = NULL, *back = NULL;

    *after = NULL;
    /* Take the bookkeeping first, so that nothing is half done. */
    if ((before_len && !(front = wd_calloc(1, sizeof *front))) || (after_len && !(back = wd_calloc(1, sizeof *back)))) {
        free(front);
        return NULL;
    }
    wa__tree_erase(&pool->blocks, b);
    if (front) {
        *front = (wa_block){.addr = b->addr, .size = before_len, .seg = seg, .mapped = true};
        wa__link_before(b, front);
        front->gc_base = pool->get_free_calls;
        wa__tree_insert(&pool->blocks, front);
    }
    if (back) {
        *back = (wa_block){.addr = start + size, .size = after_len, .seg = seg, .mapped = true};
        wa__link_after(b, back);
        back->gc_base = pool->get_free_calls;
        wa__tree_insert(&pool->blocks, back);
    }
    for (size_t i = first; i < last;) {
        size_t n = (size_t)(seg->pages[i].size / seg->page);
        unmap_pages(a, seg, i);
        i += n;
    }
    b->addr = start;
    b->size = size;
    b->mapped = false;
    wa__merge(b, b->prev);
    wa__merge(b, b->next);
    wa__tree_insert(&pool->unmapped, b);
    wa__stat_sub(&d->stats.reserved_bytes, size);
    d->stats.num_device_free++;
    *after = back;
    return b;
}

/* unmap_block(): gives back every physical allocation wholly inside the free
 * block b (a page each, unless expandable_coalesce made them larger).
 * Returns the last range unmapped (the block that survives the merges), or
 * NULL when nothing could go back. */
static wa_block *unmap_block(wa_allocator *a, wa_pool *pool, wa_block *b)
{
    wa_block *unmapped = NULL;

    while (b) {
        wa_segment *seg = b->seg;
        uint64_t base = seg->mem.addr;
        size_t first = (size_t)((b->addr - base + seg->page - 1) / seg->page);
        size_t last = (size_t)((b->addr - base + b->size) / seg->page);
        size_t rs = SIZE_MAX, re = 0;

        /* The first run of allocations that lie wholly within the free pages. */
        for (size_t i = first; i < last;) {
            size_t h = seg->chunk[i], n = (size_t)(seg->pages[h].size / seg->page);
            bool inside = h >= first && h + n <= last;
            if (inside && rs == SIZE_MAX)
                rs = h;
            if (inside)
                re = h + n;
            else if (rs != SIZE_MAX)
                break;
            i = h + n > i ? h + n : i + 1;
        }
        if (rs == SIZE_MAX)
            break;
        if (!(unmapped = carve(a, pool, b, rs, re, &b)))
            break;
    }
    return unmapped;
}

/* ---- giving memory back ---------------------------------------------------- */

void wa__release_free_chunks(wa_allocator *a, wa_block *b)
{
    unmap_block(a, wa__pool_of(b), b);
}

/* release_blocks(): every unsplit free block of a classic segment goes back;
 * expandable segments give back their free pages, and the whole address
 * range once nothing is left in it. */
static void release_pool(wa_allocator *a, wa_pool *pool)
{
    size_t n = pool->blocks.count;
    wa_block **all;

    /* Expandable segments already wholly unmapped (expandable_coalesce gives
     * pages back as blocks are freed): their address ranges go now. */
    for (wa_block *r = wa__tree_lower_bound(&pool->unmapped, 0, 0), *next; r; r = next) {
        next = wa__tree_next(&pool->unmapped, r);
        if (!wa__is_split(r))
            expandable_release(a, pool, r);
    }
    if (!n || !(all = wd_malloc(n * sizeof *all)))
        return; /* without scratch space nothing is released; the caller sees the OOM */
    n = wa__tree_collect(&pool->blocks, all);
    for (size_t i = 0; i < n; i++) {
        wa_block *b = all[i];
        if (b->seg->expandable) {
            wa_block *u = unmap_block(a, pool, b);
            if (u && !wa__is_split(u))
                expandable_release(a, pool, u);
        } else if (!wa__is_split(b)) {
            segment_release(a, b);
        }
    }
    free(all);
}

/* release_cached_blocks() */
void wa__release_cached(wa_allocator *a, int device)
{
    for (wa_arena *ar = &a->dev[device].common; ar; ar = ar->next)
        if (!ar->asleep) {
            release_pool(a, &ar->large);
            release_pool(a, &ar->small);
        }
}

/* release_available_cached_blocks(): free oversize cached blocks, just enough
 * for the request, largest first. Only when max_split_size is set, and only
 * classic segments (PyTorch's release_block cannot take expandable ones). */
bool wa__release_available(wa_allocator *a, wa_pool *pool, uint64_t size)
{
    uint64_t max_split = a->conf.max_split_size, want, released = 0;
    wa_block *b;

    if (max_split == UINT64_MAX)
        return false;
    want = size < max_split ? max_split : size;
    if ((b = wa__tree_lower_bound(&pool->blocks, want, 0))) {
        /* A split block cannot go back alone; oversize blocks are never split,
         * so this only happens after max_split_size grew. */
        if (wa__is_split(b) || b->seg->expandable)
            return false;
        segment_release(a, b);
        return true;
    }
    /* No single block is large enough: free oversize blocks, largest first. */
    b = wa__tree_max(&pool->blocks);
    while (b && released < want && b->size >= max_split) {
        wa_block *below = wa__tree_prev(&pool->blocks, b);
        if (!wa__is_split(b) && !b->seg->expandable) {
            released += b->size;
            segment_release(a, b);
        }
        b = below;
    }
    return released >= want;
}

/* garbage_collect_cached_blocks(): when reserved passes the threshold share of
 * capacity, free unsplit cached large blocks older than the average age;
 * PyTorch's large pool holds every stream's blocks, so here it is each
 * awake arena's, in turn, until enough is back. */
static uint64_t collect_pool(wa_allocator *a, wa_pool *pool, uint64_t target)
{
    uint64_t total_age = 0, reclaimed = 0;
    size_t n, freeable = 0;
    wa_block **all;
    bool freed = true;

    if (!pool->blocks.count || !(all = wd_malloc(pool->blocks.count * sizeof *all)))
        return 0;
    n = wa__tree_collect(&pool->blocks, all);
    for (size_t i = 0; i < n; i++) {
        if (wa__is_split(all[i]) || all[i]->seg->expandable) {
            all[i] = NULL;
            continue;
        }
        total_age += pool->get_free_calls - all[i]->gc_base;
        freeable++;
    }
    while (reclaimed < target && freed && freeable > 0) {
        double age_threshold = (double)total_age / (double)freeable;
        freed = false;
        for (size_t i = 0; i < n; i++) {
            wa_block *b = all[i];
            uint64_t age;
            if (!b)
                continue;
            age = pool->get_free_calls - b->gc_base;
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
    return reclaimed;
}

void wa__garbage_collect(wa_allocator *a, wa_device *d)
{
    uint64_t threshold = (uint64_t)(a->conf.garbage_collection_threshold * (double)d->limit);
    uint64_t reserved = (uint64_t)d->stats.reserved_bytes.current, target, reclaimed = 0;

    if (reserved <= threshold)
        return;
    target = reserved - threshold;
    for (wa_arena *ar = &d->common; ar && reclaimed < target; ar = ar->next)
        if (!ar->asleep)
            reclaimed += collect_pool(a, &ar->large, target - reclaimed);
}

/* ---- memory from an earlier allocator -------------------------------------- */

int wa_adopt(wa_allocator *a, int device, const wa_piece *pieces, size_t n, uint64_t page, uint64_t requested,
             wa_block **out, wd_error *err)
{
    wa_backend *be = a->backend;
    wa_device *d;
    wa_segment *seg = NULL;
    wa_block *b = NULL;
    uint64_t size = 0;
    size_t done = 0;
    int rc;

    if (device < 0 || device >= a->n_devices)
        return wd_error_set(err, -ENODEV, "no device %d", device);
    if (!be->import)
        return wd_error_set(err, -ENOTSUP, "the %s backend's memory cannot outlive the process that made it",
                            be->name);
    d = &a->dev[device];
    for (size_t i = 0; i < n; i++) {
        if (!pieces[i].size || (n > 1 && (!page || pieces[i].size % page)))
            return wd_error_set(err, -EINVAL, "piece %zu of %zu: %llu bytes is not whole pages", i + 1, n,
                                (unsigned long long)pieces[i].size);
        size += pieces[i].size;
    }
    if (!n || requested > size)
        return wd_error_set(err, -EINVAL, "%zu pieces of %llu bytes cannot hold %llu", n,
                            (unsigned long long)size, (unsigned long long)requested);
    if (d->limit && (uint64_t)d->stats.reserved_bytes.current + size > d->limit)
        return wd_error_set(err, -ENOMEM, "device %d cannot hold %llu bytes more", device, (unsigned long long)size);
    if (n == 1) {
        wa_mem mem;
        if (!(seg = wd_calloc(1, sizeof *seg)) || !(b = wd_calloc(1, sizeof *b))) {
            rc = wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
            goto fail;
        }
        if ((rc = be->import(be, device, pieces[0].fd, size, NULL, 0, &mem, err)))
            goto fail;
        seg->mem = mem;
    } else {
        if (!(seg = wd_calloc(1, sizeof *seg)) || !(b = wd_calloc(1, sizeof *b)) ||
            !(seg->pages = wd_calloc(size / page, sizeof *seg->pages)) ||
            !(seg->chunk = wd_malloc(size / page * sizeof *seg->chunk))) {
            rc = wd_error_set(err, -ENOMEM, "out of host memory for allocator bookkeeping");
            goto fail;
        }
        if ((rc = be->va_reserve(be, device, size, &seg->mem, err)))
            goto fail;
        seg->expandable = seg->coalesce = true; /* its pages count as they are mapped */
        seg->page = page;
        seg->n_pages = (size_t)(size / page);
        for (uint64_t at = 0; done < n; at += pieces[done++].size) {
            size_t head = (size_t)(at / page);
            if ((rc = be->import(be, device, pieces[done].fd, pieces[done].size, &seg->mem, at, &seg->pages[head], err)))
                goto fail;
            for (size_t k = head; k < head + pieces[done].size / page; k++)
                seg->chunk[k] = (uint32_t)head;
        }
    }
    seg->size = size;
    seg->device = device;
    seg->small = size <= WA_SMALL_SIZE;
    seg->arena = &d->common;
    seg->id = a->next_segment_id++;
    seg->head = b;
    segment_link(d, seg);
    *b = (wa_block){.addr = seg->mem.addr, .size = size, .seg = seg, .mapped = true};
    if (seg->expandable) {
        wa__stat_add(&d->stats.reserved_bytes, size);
        d->stats.num_device_alloc += n;
    } else {
        count_classic_segment(a, d, seg);
    }
    wa__count_handed_out(a, d, b, requested);
    *out = b;
    return 0;
fail:
    /* The pieces imported so far are unmapped; their descriptors stay the caller's. */
    if (seg && seg->expandable) {
        uint64_t at = 0;
        for (size_t i = 0; i < done; at += pieces[i++].size) {
            wa_mem *pg = &seg->pages[at / page];
            pg->fd = -1;
            be->page_unmap(be, device, &seg->mem, pg);
        }
        be->va_release(be, device, &seg->mem);
    }
    if (seg) {
        free(seg->pages);
        free(seg->chunk);
    }
    free(seg);
    free(b);
    return rc;
}
