/* The fake backend: segments are byte counts against a capacity, at CUDA's
 * 2 MiB granularity, with no memory behind them. Addresses are taken from
 * the top of the highest free range that fits and reused once freed, which
 * is how cudaMalloc placed them in the parity runs: best fit breaks ties by
 * address, so with bottom-up addresses two of ten traces came out up to
 * 4 GiB off PyTorch's figures, and with top-down all ten match
 * (bench/results/). */
#include "allocator/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"

typedef struct va_range {
    uint64_t start, end;
} va_range;

typedef struct fake_backend {
    wa_backend base;
    uint64_t capacity;
    uint64_t *used;
    va_range *free;       /* free address ranges, in address order, coalesced */
    size_t n_free, cap_free;
} fake_backend;

#define FAKE_BASE  0x100000000000ULL
#define FAKE_SPACE (1ULL << 52) /* room for expandable reservations of 2^46 bytes and more */
#define FAKE_ALIGN (2ULL << 20)

static uint64_t align_up(uint64_t size)
{
    return (size + FAKE_ALIGN - 1) / FAKE_ALIGN * FAKE_ALIGN;
}

/* The top of the highest free range that fits. */
static int va_take(fake_backend *f, uint64_t size, uint64_t *addr)
{
    size = align_up(size);
    for (size_t i = f->n_free; i-- > 0;)
        if (f->free[i].end - f->free[i].start >= size) {
            f->free[i].end -= size;
            *addr = f->free[i].end;
            if (f->free[i].start == f->free[i].end) {
                memmove(&f->free[i], &f->free[i + 1], (f->n_free - i - 1) * sizeof *f->free);
                f->n_free--;
            }
            return 0;
        }
    return -ENOMEM;
}

static void va_give(fake_backend *f, uint64_t addr, uint64_t size)
{
    uint64_t end = addr + align_up(size);
    size_t i = 0;

    while (i < f->n_free && f->free[i].start < addr)
        i++;
    if (i > 0 && f->free[i - 1].end == addr) {
        f->free[i - 1].end = end;
        if (i < f->n_free && f->free[i].start == end) {
            f->free[i - 1].end = f->free[i].end;
            memmove(&f->free[i], &f->free[i + 1], (f->n_free - i - 1) * sizeof *f->free);
            f->n_free--;
        }
        return;
    }
    if (i < f->n_free && f->free[i].start == end) {
        f->free[i].start = addr;
        return;
    }
    if (WD_GROW(f->free, f->cap_free, f->n_free + 1, 16))
        return; /* the range is lost to reuse; nothing else is wrong */
    memmove(&f->free[i + 1], &f->free[i], (f->n_free - i) * sizeof *f->free);
    f->free[i] = (va_range){addr, end};
    f->n_free++;
}

static int fake_seg_alloc(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err)
{
    fake_backend *f = (fake_backend *)b;
    (void)err;

    if (f->used[device] + size > f->capacity || size > f->capacity || va_take(f, size, &out->addr))
        return -ENOMEM;
    f->used[device] += size;
    out->size = size;
    out->host = NULL;
    out->fd = -1;
    out->priv = NULL;
    return 0;
}

static void fake_seg_free(wa_backend *b, int device, wa_mem *mem)
{
    fake_backend *f = (fake_backend *)b;

    if (!mem->priv) /* (evicted: its bytes went already) */
        f->used[device] -= mem->size;
    va_give(f, mem->addr, mem->size);
}

static int fake_copy(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, void *buf,
                     size_t len, wd_error *err)
{
    (void)b; (void)device; (void)mem; (void)offset; (void)buf; (void)len;
    return wd_error_set(err, -ENOTSUP, "the fake backend holds no memory to copy to or from");
}

static int fake_write(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, const void *src,
                      size_t len, wd_error *err)
{
    return fake_copy(b, device, mem, offset, (void *)src, len, err);
}

/* Expandable segments: address ranges cost nothing; pages count against the
 * capacity, at CUDA's 2 MiB granularity. */
static int fake_va_reserve(wa_backend *b, int device, uint64_t size, wa_mem *va, wd_error *err)
{
    fake_backend *f = (fake_backend *)b;
    (void)device;

    *va = (wa_mem){.size = size, .fd = -1};
    return va_take(f, size, &va->addr) ? wd_error_set(err, -ENOMEM, "out of address space") : 0;
}

static void fake_va_release(wa_backend *b, int device, wa_mem *va)
{
    (void)device;
    va_give((fake_backend *)b, va->addr, va->size);
    va->size = 0;
}

static int fake_page_map(wa_backend *b, int device, const wa_mem *va, uint64_t offset, uint64_t size, wa_mem *page,
                         wd_error *err)
{
    fake_backend *f = (fake_backend *)b;
    (void)err;

    if (size > f->capacity || f->used[device] + size > f->capacity)
        return -ENOMEM;
    f->used[device] += size;
    *page = (wa_mem){.addr = va->addr + offset, .size = size, .fd = -1};
    return 0;
}

static void fake_page_unmap(wa_backend *b, int device, const wa_mem *va, wa_mem *page)
{
    fake_backend *f = (fake_backend *)b;
    (void)va;

    if (!page->priv)
        f->used[device] -= page->size;
    page->size = 0;
}

/* priv marks evicted memory: fake memory has no state of its own. */
static void fake_evict(wa_backend *b, int device, wa_mem *mem)
{
    ((fake_backend *)b)->used[device] -= mem->size;
    mem->priv = (void *)1;
}

static int fake_restore(wa_backend *b, int device, wa_mem *mem, wd_error *err)
{
    fake_backend *f = (fake_backend *)b;

    if (f->used[device] + mem->size > f->capacity)
        return wd_error_set(err, -ENOMEM, "device %d cannot hold %llu bytes more", device,
                            (unsigned long long)mem->size);
    f->used[device] += mem->size;
    mem->priv = NULL;
    return 0;
}

static int fake_describe(wa_backend *b, int device, wa_device_info *out)
{
    fake_backend *f = (fake_backend *)b;

    snprintf(out->name, sizeof out->name, "fake device %d", device);
    snprintf(out->uuid, sizeof out->uuid, "fake-%d", device);
    out->capacity = f->capacity;
    return 0;
}

static uint64_t fake_free_bytes(wa_backend *b, int device)
{
    fake_backend *f = (fake_backend *)b;
    return f->capacity - f->used[device];
}

static void fake_destroy(wa_backend *b)
{
    fake_backend *f = (fake_backend *)b;

    free(f->used);
    free(f->free);
    free(f);
}

int wa_backend_fake_create(int n_devices, uint64_t capacity, wa_backend **out, wd_error *err)
{
    fake_backend *f = calloc(1, sizeof *f);

    if (!f || !(f->used = calloc((size_t)n_devices, sizeof *f->used)) || !(f->free = malloc(16 * sizeof *f->free))) {
        if (f)
            free(f->used);
        free(f);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    f->base = (wa_backend){
        .name = "fake",
        .share = WA_SHARE_NONE,
        .n_devices = n_devices,
        .seg_alloc = fake_seg_alloc,
        .seg_free = fake_seg_free,
        .write = fake_write,
        .read = fake_copy,
        .describe = fake_describe,
        .free_bytes = fake_free_bytes,
        .destroy = fake_destroy,
        .va_reserve = fake_va_reserve,
        .va_release = fake_va_release,
        .page_map = fake_page_map,
        .page_unmap = fake_page_unmap,
        .evict = fake_evict,
        .restore = fake_restore,
    };
    f->capacity = capacity;
    f->free[0] = (va_range){FAKE_BASE, FAKE_BASE + FAKE_SPACE};
    f->n_free = 1;
    f->cap_free = 16;
    *out = &f->base;
    return 0;
}
