/* The host backend: each segment (or each physical allocation of an
 * expandable one) is a memfd of its size, mapped into the daemon, on one of N
 * emulated devices of a fixed capacity. It takes the same path as the cuda
 * backend (one fd per allocation, passed to workers over SCM_RIGHTS), so the
 * whole daemon runs and is tested without a GPU. */
#include "allocator/backend.h"
#include "common/fault.h"

#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct host_backend {
    wa_backend base;
    uint64_t capacity;
    uint64_t *used;
} host_backend;

/* A sealed memfd of `size` bytes for `device`: a worker that gets it can map
 * it but never resize it, and only its owner (the daemon's user) may open it
 * again (/proc/PID/fd/N), so a read-only copy cannot be made writable by
 * another user. commit: its pages taken now (fallocate), so that running out
 * is -ENOMEM here rather than a fault later. */
static int segment_memfd(int device, uint64_t size, bool commit, int *out, wd_error *err)
{
    char name[48];
    int fd, rc;

    snprintf(name, sizeof name, "weightd-host%d", device);
    if ((fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0) {
        rc = -errno;
        wd_error_set(err, rc, "memfd_create for %llu bytes: %s", (unsigned long long)size, strerror(errno));
        return rc == -ENFILE || rc == -EMFILE ? -ENOMEM : rc; /* out of memfds is out of memory */
    }
    if (ftruncate(fd, (off_t)size) < 0 || fchmod(fd, 0400) < 0 ||
        (commit && fallocate(fd, 0, 0, (off_t)size) < 0) ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
        rc = errno == ENOSPC ? -ENOMEM : -errno;
        wd_error_set(err, rc, "making a %llu-byte segment: %s", (unsigned long long)size, strerror(errno));
        close(fd);
        return rc;
    }
    *out = fd;
    return 0;
}

static int host_seg_alloc(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err)
{
    host_backend *h = (host_backend *)b;
    void *map;
    int fd, rc;

    if (size > h->capacity || h->used[device] + size > h->capacity || wd_fault_site())
        return -ENOMEM;
    if ((rc = segment_memfd(device, size, false, &fd, err)))
        return rc;
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        rc = wd_error_set(err, -errno, "mapping a %llu-byte segment: %s", (unsigned long long)size, strerror(errno));
        close(fd);
        return rc;
    }
    h->used[device] += size;
    *out = (wa_mem){.addr = (uint64_t)(uintptr_t)map, .size = size, .host = map, .fd = fd};
    return 0;
}

static void host_seg_free(wa_backend *b, int device, wa_mem *mem)
{
    host_backend *h = (host_backend *)b;

    munmap(mem->host, mem->size);
    if (mem->fd >= 0) { /* (an evicted segment's memory went already) */
        close(mem->fd);
        h->used[device] -= mem->size;
    }
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

/* Expandable segments: an address range reserved with nothing behind it,
 * and each physical allocation its own memfd mapped at its place, as cuda's
 * VMM handles are: a worker gets the descriptors of what it attaches and no
 * more. (One sparse memfd for the whole range let a reader commit memory in
 * its holes, which nothing accounted for.) */
static int host_va_reserve(wa_backend *b, int device, uint64_t size, wa_mem *va, wd_error *err)
{
    void *map;
    (void)b;
    (void)device;

    map = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED)
        return wd_error_set(err, -errno, "reserving %llu bytes of address space: %s", (unsigned long long)size,
                            strerror(errno));
    *va = (wa_mem){.addr = (uint64_t)(uintptr_t)map, .size = size, .host = map, .fd = -1};
    return 0;
}

static void host_va_release(wa_backend *b, int device, wa_mem *va)
{
    (void)b;
    (void)device;
    munmap(va->host, va->size);
    va->host = NULL;
}

static int host_page_map(wa_backend *b, int device, const wa_mem *va, uint64_t offset, uint64_t size, wa_mem *page,
                         wd_error *err)
{
    host_backend *h = (host_backend *)b;
    char *at = (char *)va->host + offset;
    int fd, rc;

    if (size > h->capacity || h->used[device] + size > h->capacity || wd_fault_site())
        return -ENOMEM;
    if ((rc = segment_memfd(device, size, true, &fd, err)))
        return rc;
    if (mmap(at, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        rc = wd_error_set(err, -errno, "mapping %llu bytes into a range: %s", (unsigned long long)size,
                          strerror(errno));
        close(fd);
        return rc;
    }
    h->used[device] += size;
    *page = (wa_mem){.addr = va->addr + offset, .size = size, .host = at, .fd = fd};
    return 0;
}

static void host_page_unmap(wa_backend *b, int device, const wa_mem *va, wa_mem *page)
{
    host_backend *h = (host_backend *)b;
    (void)va;

    /* The range keeps its hole reserved; the memory goes with the last
     * descriptor (a worker still mapping it keeps it until it unmaps). */
    mmap(page->host, page->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (page->fd >= 0) {
        close(page->fd);
        h->used[device] -= page->size;
    }
    page->fd = -1;
    page->size = 0;
}

/* The range stays, inaccessible, as an expandable segment's holes are. */
static void host_evict(wa_backend *b, int device, wa_mem *mem)
{
    host_backend *h = (host_backend *)b;

    mmap(mem->host, mem->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    close(mem->fd);
    mem->fd = -1;
    h->used[device] -= mem->size;
}

static int host_restore(wa_backend *b, int device, wa_mem *mem, wd_error *err)
{
    host_backend *h = (host_backend *)b;
    int fd, rc;

    if (h->used[device] + mem->size > h->capacity || wd_fault_site())
        return wd_error_set(err, -ENOMEM, "device %d cannot hold %llu bytes more", device,
                            (unsigned long long)mem->size);
    if ((rc = segment_memfd(device, mem->size, true, &fd, err)))
        return rc;
    if (mmap(mem->host, mem->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        rc = wd_error_set(err, -errno, "mapping %llu bytes again: %s", (unsigned long long)mem->size,
                          strerror(errno));
        close(fd);
        return rc;
    }
    mem->fd = fd;
    h->used[device] += mem->size;
    return 0;
}

/* A memfd that segment_memfd made (sealed against resizing) of `size`
 * bytes, mapped at va + offset or, without va, anywhere. */
static int host_import(wa_backend *b, int device, int fd, uint64_t size, const wa_mem *va, uint64_t offset,
                       wa_mem *out, wd_error *err)
{
    host_backend *h = (host_backend *)b;
    int seals = fcntl(fd, F_GET_SEALS);
    struct stat st;
    void *map;

    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || seals < 0 || !(seals & F_SEAL_SHRINK) ||
        !(seals & F_SEAL_GROW))
        return wd_error_set(err, -EBADF, "descriptor %d is not a segment's sealed memfd", fd);
    if ((uint64_t)st.st_size != size)
        return wd_error_set(err, -EBADF, "a segment's memfd holds %lld bytes, not %llu", (long long)st.st_size,
                            (unsigned long long)size);
    if (h->used[device] + size > h->capacity)
        return wd_error_set(err, -ENOMEM, "device %d cannot hold %llu bytes more", device, (unsigned long long)size);
    map = mmap(va ? (char *)va->host + offset : NULL, size, PROT_READ | PROT_WRITE,
               MAP_SHARED | (va ? MAP_FIXED : 0), fd, 0);
    if (map == MAP_FAILED)
        return wd_error_set(err, -errno, "mapping a %llu-byte segment: %s", (unsigned long long)size, strerror(errno));
    h->used[device] += size;
    *out = (wa_mem){.addr = (uint64_t)(uintptr_t)map, .size = size, .host = map, .fd = fd};
    return 0;
}

static int host_describe(wa_backend *b, int device, wa_device_info *out)
{
    host_backend *h = (host_backend *)b;

    snprintf(out->name, sizeof out->name, "host device %d", device);
    snprintf(out->uuid, sizeof out->uuid, "host-%d", device);
    out->capacity = h->capacity;
    return 0;
}

static uint64_t host_free_bytes(wa_backend *b, int device)
{
    host_backend *h = (host_backend *)b;
    return h->capacity - h->used[device];
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
    h = wd_calloc(1, sizeof *h);
    if (!h || !(h->used = wd_calloc((size_t)n_devices, sizeof *h->used))) {
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
        .free_bytes = host_free_bytes,
        .destroy = host_destroy,
        .va_reserve = host_va_reserve,
        .va_release = host_va_release,
        .page_map = host_page_map,
        .page_unmap = host_page_unmap,
        .evict = host_evict,
        .restore = host_restore,
        .import = host_import,
    };
    h->capacity = capacity;
    *out = &h->base;
    return 0;
}
