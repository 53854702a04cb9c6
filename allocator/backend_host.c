/* The host backend: each segment is a memfd of the segment's size, mapped
 * into the daemon, on one of N emulated devices of a fixed capacity. It takes
 * the same path as the cuda backend (one fd per segment, passed to workers
 * over SCM_RIGHTS), so the whole daemon runs and is tested without a GPU. */
#include "allocator/backend.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct host_backend {
    wa_backend base;
    uint64_t capacity;
    uint64_t *used;
} host_backend;

static int host_seg_alloc(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err)
{
    host_backend *h = (host_backend *)b;
    char name[48];
    void *map = MAP_FAILED;
    int fd = -1, rc;

    if (size > h->capacity || h->used[device] + size > h->capacity)
        return -ENOMEM;
    snprintf(name, sizeof name, "weightd-host%d", device);
    fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        rc = -errno;
        wd_error_set(err, rc, "memfd_create for a %llu-byte segment: %s", (unsigned long long)size, strerror(errno));
        goto fail;
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        rc = -errno;
        wd_error_set(err, rc, "sizing a %llu-byte segment: %s", (unsigned long long)size, strerror(errno));
        goto fail;
    }
    /* Workers that map the segment must not be able to shrink it under us. */
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
        rc = -errno;
        wd_error_set(err, rc, "sealing a segment: %s", strerror(errno));
        goto fail;
    }
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        rc = -errno;
        wd_error_set(err, rc, "mapping a %llu-byte segment: %s", (unsigned long long)size, strerror(errno));
        goto fail;
    }
    h->used[device] += size;
    out->addr = (uint64_t)(uintptr_t)map;
    out->size = size;
    out->host = map;
    out->fd = fd;
    out->priv = NULL;
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    /* Running out of address space or memfds is running out of memory. */
    return rc == -ENFILE || rc == -EMFILE ? -ENOMEM : rc;
}

static void host_seg_free(wa_backend *b, int device, wa_mem *mem)
{
    host_backend *h = (host_backend *)b;

    munmap(mem->host, mem->size);
    close(mem->fd);
    h->used[device] -= mem->size;
    mem->host = NULL;
    mem->fd = -1;
}

static int host_check(const wa_mem *mem, uint64_t offset, size_t len, wd_error *err)
{
    if (offset > mem->size || len > mem->size - offset)
        return wd_error_set(err, -ERANGE, "copy of %zu bytes at offset %llu runs past a %llu-byte segment", len,
                            (unsigned long long)offset, (unsigned long long)mem->size);
    return 0;
}

static int host_write(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, const void *src,
                      size_t len, wd_error *err)
{
    int rc;
    (void)b; (void)device;

    if ((rc = host_check(mem, offset, len, err)))
        return rc;
    memcpy((char *)mem->host + offset, src, len);
    return 0;
}

static int host_read(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, void *dst, size_t len,
                     wd_error *err)
{
    int rc;
    (void)b; (void)device;

    if ((rc = host_check(mem, offset, len, err)))
        return rc;
    memcpy(dst, (const char *)mem->host + offset, len);
    return 0;
}

/* Expandable segments: one sparse memfd the size of the address range,
 * mapped whole; a page is committed with fallocate and given back by punching
 * a hole, so a segment is one descriptor however many pages it maps. */
static int host_va_reserve(wa_backend *b, int device, uint64_t size, wa_mem *va, wd_error *err)
{
    char name[48];
    void *map;
    int fd, rc;
    (void)b;

    snprintf(name, sizeof name, "weightd-host%d-expandable", device);
    if ((fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0)
        return wd_error_set(err, -errno, "memfd_create: %s", strerror(errno));
    if (ftruncate(fd, (off_t)size) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
        rc = wd_error_set(err, -errno, "sizing a %llu-byte address range: %s", (unsigned long long)size,
                          strerror(errno));
        close(fd);
        return rc;
    }
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (map == MAP_FAILED) {
        rc = wd_error_set(err, -errno, "mapping a %llu-byte address range: %s", (unsigned long long)size,
                          strerror(errno));
        close(fd);
        return rc;
    }
    *va = (wa_mem){.addr = (uint64_t)(uintptr_t)map, .size = size, .host = map, .fd = fd};
    return 0;
}

static void host_va_release(wa_backend *b, int device, wa_mem *va)
{
    (void)b;
    (void)device;
    munmap(va->host, va->size);
    close(va->fd);
    va->host = NULL;
    va->fd = -1;
}

static int host_page_map(wa_backend *b, int device, const wa_mem *va, uint64_t offset, uint64_t size, wa_mem *page,
                         wd_error *err)
{
    host_backend *h = (host_backend *)b;

    if (size > h->capacity || h->used[device] + size > h->capacity)
        return -ENOMEM;
    if (fallocate(va->fd, 0, (off_t)offset, (off_t)size) < 0) {
        int rc = errno == ENOSPC ? -ENOMEM : -errno;
        return wd_error_set(err, rc, "committing %llu bytes of host memory: %s", (unsigned long long)size,
                            strerror(errno));
    }
    h->used[device] += size;
    /* The range's memfd is what a worker maps; the page does not own it. */
    *page = (wa_mem){.addr = va->addr + offset, .size = size, .host = (char *)va->host + offset, .fd = va->fd,
                     .fd_offset = offset};
    return 0;
}

static void host_page_unmap(wa_backend *b, int device, const wa_mem *va, wa_mem *page)
{
    host_backend *h = (host_backend *)b;

    fallocate(va->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(page->addr - va->addr), (off_t)page->size);
    h->used[device] -= page->size;
    page->size = 0;
}

static int host_describe(wa_backend *b, int device, wa_device_info *out)
{
    host_backend *h = (host_backend *)b;

    snprintf(out->name, sizeof out->name, "host device %d", device);
    snprintf(out->uuid, sizeof out->uuid, "host-%d", device);
    out->capacity = h->capacity;
    return 0;
}

static void host_destroy(wa_backend *b)
{
    host_backend *h = (host_backend *)b;

    free(h->used);
    free(h);
}

int wa_backend_host_create(int n_devices, uint64_t capacity, wa_backend **out, wd_error *err)
{
    host_backend *h;

    if (capacity == 0)
        return wd_error_set(err, -EINVAL, "the host backend needs a capacity (--host-capacity SIZE)");
    h = calloc(1, sizeof *h);
    if (!h || !(h->used = calloc((size_t)n_devices, sizeof *h->used))) {
        free(h);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    h->base = (wa_backend){
        .name = "host",
        .n_devices = n_devices,
        .share = WA_SHARE_MEMFD,
        .seg_alloc = host_seg_alloc,
        .seg_free = host_seg_free,
        .write = host_write,
        .read = host_read,
        .describe = host_describe,
        .destroy = host_destroy,
        .va_reserve = host_va_reserve,
        .va_release = host_va_release,
        .page_map = host_page_map,
        .page_unmap = host_page_unmap,
    };
    h->capacity = capacity;
    *out = &h->base;
    return 0;
}
