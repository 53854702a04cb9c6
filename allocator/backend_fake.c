/* The fake backend: segments are byte counts against a capacity, with made-up
 * addresses that never repeat. No memory behind them. */
#include "allocator/backend.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct fake_backend {
    wa_backend base;
    uint64_t capacity;
    uint64_t next_addr;
    uint64_t *used;
} fake_backend;

#define FAKE_BASE  0x100000000000ULL
#define FAKE_ALIGN (2ULL << 20)

static int fake_seg_alloc(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err)
{
    fake_backend *f = (fake_backend *)b;
    (void)err;

    if (f->used[device] + size > f->capacity || size > f->capacity)
        return -ENOMEM;
    f->used[device] += size;
    out->addr = f->next_addr;
    out->size = size;
    out->host = NULL;
    out->fd = -1;
    out->priv = NULL;
    f->next_addr += (size + FAKE_ALIGN - 1) / FAKE_ALIGN * FAKE_ALIGN;
    return 0;
}

static void fake_seg_free(wa_backend *b, int device, wa_mem *mem)
{
    fake_backend *f = (fake_backend *)b;

    f->used[device] -= mem->size;
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
    (void)err;

    *va = (wa_mem){.addr = f->next_addr, .size = size, .fd = -1};
    f->next_addr += (size + FAKE_ALIGN - 1) / FAKE_ALIGN * FAKE_ALIGN;
    return 0;
}

static void fake_va_release(wa_backend *b, int device, wa_mem *va)
{
    (void)b;
    (void)device;
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

    f->used[device] -= page->size;
    page->size = 0;
}

static int fake_describe(wa_backend *b, int device, wa_device_info *out)
{
    fake_backend *f = (fake_backend *)b;

    snprintf(out->name, sizeof out->name, "fake device %d", device);
    snprintf(out->uuid, sizeof out->uuid, "fake-%d", device);
    out->capacity = f->capacity;
    return 0;
}

static void fake_destroy(wa_backend *b)
{
    fake_backend *f = (fake_backend *)b;

    free(f->used);
    free(f);
}

int wa_backend_fake_create(int n_devices, uint64_t capacity, wa_backend **out, wd_error *err)
{
    fake_backend *f = calloc(1, sizeof *f);

    if (!f || !(f->used = calloc((size_t)n_devices, sizeof *f->used))) {
        free(f);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    f->base = (wa_backend){
        .name = "fake",
        .n_devices = n_devices,
        .seg_alloc = fake_seg_alloc,
        .seg_free = fake_seg_free,
        .write = fake_write,
        .read = fake_copy,
        .describe = fake_describe,
        .destroy = fake_destroy,
        .granularity = FAKE_ALIGN,
        .va_reserve = fake_va_reserve,
        .va_release = fake_va_release,
        .page_map = fake_page_map,
        .page_unmap = fake_page_unmap,
    };
    f->capacity = capacity;
    f->next_addr = FAKE_BASE;
    *out = &f->base;
    return 0;
}
