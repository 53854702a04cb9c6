/* Sleep and wake of a tag's memory, as vLLM's CuMemAllocator does it inside
 * one process: the physical memory under every segment of the tag goes back
 * to the device, the address ranges stay, and wake maps new memory there.
 * A tag sleeps or wakes whole; an error leaves it as it was. */
#include "allocator/internal.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"
#include "common/fault.h"

bool wa_tag_asleep(const wa_allocator *a, uint32_t tag)
{
    for (size_t i = 0; i < a->n_tags; i++)
        if (a->tags[i] == tag)
            return true;
    return false;
}

/* The physical allocations of seg, one by one: the segment's own memory, or
 * each mapped allocation of an expandable one (pages[h] at its first page h;
 * evicted ones keep their size). NULL after the last; start with *at = 0. */
static wa_mem *next_mem(wa_segment *seg, size_t *at)
{
    if (!seg->expandable)
        return (*at)++ == 0 ? &seg->mem : NULL;
    while (*at < seg->n_pages) {
        wa_mem *m = &seg->pages[(*at)++];
        if (m->size)
            return m;
    }
    return NULL;
}

static size_t mem_count(wa_segment *seg)
{
    size_t at = 0, n = 0;

    while (next_mem(seg, &at))
        n++;
    return n;
}

static uint64_t segment_bytes(const wa_segment *seg)
{
    return seg->expandable ? wa__mapped_bytes(seg) : seg->size;
}

static void drop_saved(wa_segment *seg)
{
    for (size_t i = 0; i < seg->n_saved; i++)
        free(seg->saved[i].buf);
    free(seg->saved);
    seg->saved = NULL;
    seg->n_saved = 0;
}

/* The bytes of every block of seg handed out, into host memory. */
static int save_segment(wa_allocator *a, wa_segment *seg, wd_error *err)
{
    size_t n = 0;
    int rc = 0;

    for (wa_block *b = seg->head; b; b = b->next)
        n += b->allocated;
    if (n && !(seg->saved = wd_calloc(n, sizeof *seg->saved)))
        return wd_error_set(err, -ENOMEM, "out of host memory to keep a sleeping tag's bytes");
    for (wa_block *b = seg->head; b && !rc; b = b->next) {
        wa_saved *s = &seg->saved[seg->n_saved];
        if (!b->allocated)
            continue;
        *s = (wa_saved){.offset = b->addr - seg->mem.addr, .len = b->size, .buf = malloc(b->size)};
        if (!s->buf)
            rc = wd_error_set(err, -ENOMEM, "out of host memory to keep %" PRIu64 " bytes of a sleeping tag",
                              b->size);
        else if (!(rc = a->backend->read(a->backend, seg->device, &seg->mem, s->offset, s->buf, s->len, err)))
            seg->n_saved++;
        else
            free(s->buf);
    }
    if (rc)
        drop_saved(seg);
    return rc;
}

static void set_asleep(wa_allocator *a, uint32_t tag, bool asleep)
{
    for (int i = 0; i < a->n_devices; i++) {
        for (wa_arena *ar = &a->dev[i].common; ar; ar = ar->next)
            if (ar->tag == tag)
                ar->asleep = asleep;
        for (wa_segment *seg = a->dev[i].segments; seg; seg = seg->next)
            if (seg->arena->tag == tag)
                seg->asleep = asleep;
    }
}

/* Every allocation of seg evicted; returns how many. */
static size_t evict_mems(wa_allocator *a, wa_segment *seg)
{
    size_t at = 0, n = 0;

    for (wa_mem *m; (m = next_mem(seg, &at)); n++)
        a->backend->evict(a->backend, seg->device, m);
    return n;
}

int wa_tag_sleep(wa_allocator *a, uint32_t tag, bool offload, wd_error *err)
{
    int rc = 0;

    if (tag == 0)
        return wd_error_set(err, -EINVAL, "tag 0 is the common pools: only memory under a tag of its own sleeps");
    if (!a->backend->evict)
        return wd_error_set(err, -ENOTSUP, "the %s backend cannot give memory back and keep its addresses",
                            a->backend->name);
    if (wa_tag_asleep(a, tag))
        return wd_error_set(err, -EALREADY, "tag %" PRIu32 " is asleep already", tag);
    if (WD_GROW(a->tags, a->cap_tags, a->n_tags + 1, 4))
        return wd_error_set(err, -ENOMEM, "out of host memory");
    for (int i = 0; offload && !rc && i < a->n_devices; i++)
        for (wa_segment *seg = a->dev[i].segments; seg && !rc; seg = seg->next)
            if (seg->arena->tag == tag)
                rc = save_segment(a, seg, err);
    if (rc) {
        for (int i = 0; i < a->n_devices; i++)
            for (wa_segment *seg = a->dev[i].segments; seg; seg = seg->next)
                drop_saved(seg);
        return rc;
    }
    for (int i = 0; i < a->n_devices; i++)
        for (wa_segment *seg = a->dev[i].segments; seg; seg = seg->next)
            if (seg->arena->tag == tag) {
                a->dev[i].stats.num_device_free += evict_mems(a, seg);
                wa__stat_sub(&a->dev[i].stats.reserved_bytes, segment_bytes(seg));
            }
    a->tags[a->n_tags++] = tag;
    set_asleep(a, tag, true);
    return 0;
}

/* Memory again under seg; on failure, none (what it restored evicted again). */
static int restore_segment(wa_allocator *a, wa_segment *seg, wd_error *err)
{
    size_t at = 0, undo = 0;
    wa_mem *m;
    int rc = 0;

    while ((m = next_mem(seg, &at)) && !(rc = a->backend->restore(a->backend, seg->device, m, err)))
        ;
    if (!rc)
        return 0;
    for (wa_mem *u; (u = next_mem(seg, &undo)) && u != m;)
        a->backend->evict(a->backend, seg->device, u);
    return rc;
}

static int write_back(wa_allocator *a, wa_segment *seg, wd_error *err)
{
    int rc = 0;

    for (size_t i = 0; i < seg->n_saved && !rc; i++)
        rc = a->backend->write(a->backend, seg->device, &seg->mem, seg->saved[i].offset, seg->saved[i].buf,
                               seg->saved[i].len, err);
    return rc;
}

int wa_tag_wake(wa_allocator *a, uint32_t tag, wd_error *err)
{
    wa_segment *failed = NULL;
    int i, rc = 0;

    if (!wa_tag_asleep(a, tag))
        return wd_error_set(err, -EALREADY, "tag %" PRIu32 " is not asleep", tag);
    for (i = 0; i < a->n_devices; i++) {
        wa_device *d = &a->dev[i];
        uint64_t bytes = 0;
        for (wa_segment *seg = d->segments; seg; seg = seg->next)
            if (seg->arena->tag == tag)
                bytes += segment_bytes(seg);
        if (d->limit && (uint64_t)d->stats.reserved_bytes.current + bytes > d->limit)
            return wd_error_set(err, -ENOMEM, "device %d cannot take tag %" PRIu32 "'s %" PRIu64 " bytes back: "
                                "%" PRId64 " of its %" PRIu64 " are reserved", i, tag, bytes,
                                d->stats.reserved_bytes.current, d->limit);
    }
    /* Memory under every segment and its bytes back; a failure undoes it
     * all, and the tag sleeps on with its bytes. */
    for (i = 0; i < a->n_devices && !failed; i++)
        for (wa_segment *seg = a->dev[i].segments; seg && !failed; seg = seg->next) {
            if (seg->arena->tag != tag)
                continue;
            if ((rc = restore_segment(a, seg, err))) {
                failed = seg;
            } else if ((rc = write_back(a, seg, err))) {
                evict_mems(a, seg);
                failed = seg;
            }
        }
    for (i = 0; i < a->n_devices; i++)
        for (wa_segment *seg = a->dev[i].segments; seg; seg = seg->next) {
            if (seg == failed)
                return rc;
            if (seg->arena->tag != tag)
                continue;
            if (failed) {
                evict_mems(a, seg);
                continue;
            }
            drop_saved(seg);
            a->dev[i].stats.num_device_alloc += mem_count(seg);
            wa__stat_add(&a->dev[i].stats.reserved_bytes, segment_bytes(seg));
        }
    for (size_t k = 0; k < a->n_tags; k++)
        if (a->tags[k] == tag)
            a->tags[k] = a->tags[--a->n_tags];
    set_asleep(a, tag, false);
    return 0;
}

void wa__sleep_forget(wa_allocator *a)
{
    /* Their memory went at sleep; freed, they go back as if it were there
     * (the backends take evicted memory). */
    for (int i = 0; i < a->n_devices; i++)
        for (wa_segment *seg = a->dev[i].segments; seg; seg = seg->next)
            if (seg->asleep) {
                drop_saved(seg);
                wa__stat_add(&a->dev[i].stats.reserved_bytes, segment_bytes(seg));
            }
    while (a->n_tags)
        set_asleep(a, a->tags[--a->n_tags], false);
}
