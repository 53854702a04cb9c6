/* Statistics, snapshots and the structural check. */
#include "allocator/internal.h"
#include "common/fault.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

int wa_get_stats(const wa_allocator *a, int device, wa_stats *out)
{
    const wa_device *d;
    uint64_t cached;

    if (device < 0 || device >= a->n_devices)
        return -ENODEV;
    d = &a->dev[device];
    *out = d->stats;
    out->largest_free_block = 0;
    for (const wa_arena *ar = &d->common; ar; ar = ar->next) {
        const wa_block *big = wa__tree_max(&ar->large.blocks), *small = wa__tree_max(&ar->small.blocks);
        if (big && big->size > out->largest_free_block)
            out->largest_free_block = big->size;
        if (small && small->size > out->largest_free_block)
            out->largest_free_block = small->size;
    }
    cached = (uint64_t)(d->stats.reserved_bytes.current - d->stats.allocated_bytes.current);
    out->fragmentation = cached && out->largest_free_block < cached
                             ? 1.0 - (double)out->largest_free_block / (double)cached
                             : 0.0;
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
    if (!(out = wd_calloc(count ? count : 1, sizeof *out)))
        return -ENOMEM;
    for (seg = a->dev[device].segments; seg; seg = seg->next, i++) {
        size_t nb = 0, j = 0;
        for (const wa_block *b = seg->head; b; b = b->next)
            nb++;
        out[i].id = seg->id;
        out[i].addr = seg->mem.addr;
        out[i].size = seg->size;
        out[i].mapped = seg->asleep ? 0 : seg->expandable ? wa__mapped_bytes(seg) : seg->size;
        out[i].small_pool = seg->small;
        out[i].expandable = seg->expandable;
        out[i].n_blocks = nb;
        if (!(out[i].blocks = wd_calloc(nb, sizeof *out[i].blocks))) {
            wa_snapshot_free(out, i);
            return -ENOMEM;
        }
        for (const wa_block *b = seg->head; b; b = b->next, j++)
            out[i].blocks[j] = (wa_snap_block){b->addr, b->size, b->requested, b->allocated, b->mapped};
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

#define BROKEN(...) wd_error_set(err, -EFAULT, __VA_ARGS__)

/* The tree is in order, holds `expect` blocks, each free and in the mapped
 * state the tree is for. */
static int check_tree(const wa_tree *t, bool mapped, size_t expect, int dev, const char *what, wd_error *err)
{
    wa_block **all = wd_malloc((t->count ? t->count : 1) * sizeof *all);
    size_t n;
    int rc = 0;

    if (!all)
        return 0; /* nothing to check with; not a broken invariant */
    n = wa__tree_collect(t, all);
    if (n != t->count || n != expect)
        rc = BROKEN("device %d: %s holds %zu blocks, counts %zu, expected %zu", dev, what, n, t->count, expect);
    for (size_t i = 0; !rc && i < n; i++) {
        const wa_block *p = i ? all[i - 1] : NULL, *b = all[i];
        bool ordered = !p || (t->by_addr ? p->addr < b->addr
                                         : p->size < b->size || (p->size == b->size && p->addr < b->addr));
        if (b->allocated || b->mapped != mapped)
            rc = BROKEN("device %d: %s holds a block in the wrong state", dev, what);
        else if (!ordered)
            rc = BROKEN("device %d: %s out of order", dev, what);
    }
    free(all);
    return rc;
}

/* Pages of an expandable segment are mapped exactly where mapped blocks lie. */
static int check_pages(const wa_segment *seg, const wa_block *b, int dev, wd_error *err)
{
    uint64_t base = seg->mem.addr;
    size_t first = (size_t)((b->addr - base) / seg->page);
    size_t last = (size_t)((b->addr - base + b->size + seg->page - 1) / seg->page);

    if (!b->mapped && ((b->addr - base) % seg->page || b->size % seg->page))
        return BROKEN("device %d segment %u: unmapped block at %#" PRIx64 " is not page-aligned", dev, seg->id,
                      b->addr);
    /* Pages past n_pages were never mapped: only a mapped block may not reach
     * there, and the unmapped tail (most of a segment's reserve) needs no walk. */
    for (size_t i = first; i < last && i < seg->n_pages; i++) {
        bool mapped = seg->chunk[i] != WA_UNMAPPED;
        if (mapped != b->mapped)
            return BROKEN("device %d segment %u: page %zu is %smapped under a%s block", dev, seg->id, i,
                          mapped ? "" : "not ", b->mapped ? " mapped" : "n unmapped");
    }
    if (b->mapped && last > seg->n_pages)
        return BROKEN("device %d segment %u: page %zu is not mapped under a mapped block", dev, seg->id,
                      seg->n_pages > first ? seg->n_pages : first);
    return 0;
}

/* Each arena's trees hold exactly the free blocks of its segments. */
static int check_arenas(const wa_device *d, int dev, wd_error *err)
{
    for (const wa_arena *ar = &d->common; ar; ar = ar->next) {
        size_t free_mapped[2] = {0, 0}, unmapped[2] = {0, 0};
        int rc;

        for (const wa_segment *seg = d->segments; seg; seg = seg->next) {
            if (seg->arena != ar)
                continue;
            for (const wa_block *b = seg->head; b; b = b->next)
                if (!b->allocated)
                    (b->mapped ? free_mapped : unmapped)[seg->small]++;
        }
        if ((rc = check_tree(&ar->small.blocks, true, free_mapped[1], dev, "a small pool", err)) ||
            (rc = check_tree(&ar->large.blocks, true, free_mapped[0], dev, "a large pool", err)) ||
            (rc = check_tree(&ar->small.unmapped, false, unmapped[1], dev, "a small unmapped set", err)) ||
            (rc = check_tree(&ar->large.unmapped, false, unmapped[0], dev, "a large unmapped set", err)))
            return rc;
    }
    return 0;
}

int wa_check(const wa_allocator *a, wd_error *err)
{
    for (int i = 0; i < a->n_devices; i++) {
        const wa_device *d = &a->dev[i];
        wa_stats recount;
        int rc;

        memset(&recount, 0, sizeof recount);
        for (const wa_segment *seg = d->segments; seg; seg = seg->next) {
            uint64_t at = seg->mem.addr;
            const wa_block *prev = NULL;
            if (!seg->head || seg->head->prev)
                return BROKEN("device %d segment %u: bad head block", i, seg->id);
            for (const wa_block *b = seg->head; b; prev = b, b = b->next) {
                if (b->seg != seg || b->prev != prev)
                    return BROKEN("device %d segment %u: broken block links", i, seg->id);
                if (b->addr != at || b->size == 0)
                    return BROKEN("device %d segment %u: block at %#" PRIx64 " does not follow the previous one "
                                  "(expected %#" PRIx64 ")", i, seg->id, b->addr, at);
                if (!b->allocated && prev && !prev->allocated && prev->mapped == b->mapped)
                    return BROKEN("device %d segment %u: free neighbours at %#" PRIx64 " not merged", i, seg->id,
                                  b->addr);
                if (!b->mapped && (b->allocated || !seg->expandable))
                    return BROKEN("device %d segment %u: an unmapped block where there can be none", i, seg->id);
                if (seg->expandable && !seg->asleep && (rc = check_pages(seg, b, i, err)))
                    return rc;
                at += b->size;
                if (b->allocated) {
                    recount.allocation.current++;
                    recount.allocated_bytes.current += (int64_t)b->size;
                    recount.requested_bytes.current += (int64_t)b->requested;
                    if (b->counted_oversize)
                        recount.oversize_allocations.current++;
                } else if (b->mapped) {
                    if (!seg->expandable && wa__is_split(b)) {
                        recount.inactive_split.current++;
                        recount.inactive_split_bytes.current += (int64_t)b->size;
                    }
                }
            }
            if (at != seg->mem.addr + seg->size)
                return BROKEN("device %d segment %u: blocks cover %" PRIu64 " of %" PRIu64 " bytes", i, seg->id,
                              at - seg->mem.addr, seg->size);
            if (seg->asleep != seg->arena->asleep)
                return BROKEN("device %d segment %u: asleep apart from its tag", i, seg->id);
            if (seg->expandable) {
                if (!seg->asleep) /* asleep, its pages hold no memory */
                    recount.reserved_bytes.current += (int64_t)wa__mapped_bytes(seg);
            } else {
                recount.segment.current++;
                if (!seg->asleep)
                    recount.reserved_bytes.current += (int64_t)seg->size;
                if (seg->counted_oversize)
                    recount.oversize_segments.current++;
            }
        }
        recount.active = recount.allocation;
        recount.active_bytes = recount.allocated_bytes;
#define CHECK(name, what)                                                                                   \
        if (recount.name.current != d->stats.name.current)                                                  \
            return BROKEN("device %d: statistic " #name " is %" PRId64 " but a recount gives %" PRId64, i,  \
                          d->stats.name.current, recount.name.current);                                     \
        if (d->stats.name.peak < d->stats.name.current)                                                     \
            return BROKEN("device %d: " #name " peak below current", i);
        WA_STAT_LIST(CHECK)
#undef CHECK
        if ((rc = check_arenas(d, i, err)))
            return rc;
        if (d->limit && (uint64_t)d->stats.reserved_bytes.current > d->limit)
            return BROKEN("device %d: reserved over capacity", i);
    }
    return 0;
}
