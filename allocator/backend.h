/* The layer under the allocator: where segments come from.
 *
 * The allocator never calls CUDA or the OS itself; it asks a backend for
 * whole segments and carves blocks out of them. Backends:
 *   fake  byte counts against a capacity, no memory (replay, tests)
 *   host  a memfd per segment, mmap'ed; emulated devices (CI, everywhere)
 *   cuda, cuda-ipc  real GPUs (built where the CUDA toolkit is found)
 * Every backend function runs on the thread that owns the allocator, except
 * write/read, which the loader calls from its worker threads on segments it
 * holds blocks in. */
#ifndef WA_BACKEND_H
#define WA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/errors.h"

/* One segment's memory, as the backend made it: a classic segment, an
 * expandable segment's address range, or one physical allocation mapped
 * into such a range. */
typedef struct wa_mem {
    uint64_t addr;   /* device address (a made-up one on fake) */
    uint64_t size;
    void *host;      /* CPU mapping of the whole segment, or NULL */
    int fd;          /* shareable handle of this memory alone, which a worker can map; or -1 */
    void *priv;      /* the backend's own */
} wa_mem;

/* How a worker maps a backend's memory (attach; DESIGN.md, "Backends"). */
typedef enum wa_share {
    WA_SHARE_NONE,   /* fake: there is nothing to map */
    WA_SHARE_MEMFD,  /* host: fd is a memfd of size bytes; a worker mmaps it */
    WA_SHARE_VMM,    /* cuda: fd is a POSIX-fd handle of one whole cuMemCreate allocation */
    WA_SHARE_IPC,    /* cuda-ipc: a legacy IPC handle (ipc_handle) of one whole cuMemAlloc allocation */
} wa_share;

#define WA_IPC_HANDLE_BYTES 64 /* CU_IPC_HANDLE_SIZE */

typedef struct wa_device_info {
    char name[128];        /* "host device 0", "NVIDIA H200 (CUDA device 0)" */
    char uuid[48];         /* stable identity where the backend has one */
    uint64_t capacity;     /* bytes the allocator may reserve on it */
} wa_device_info;

typedef struct wa_backend wa_backend;
struct wa_backend {
    const char *name;
    int n_devices;
    wa_share share;
    /* -ENOMEM when the device cannot hold `size` more bytes. */
    int (*seg_alloc)(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err);
    void (*seg_free)(wa_backend *b, int device, wa_mem *mem);
    /* Copy between host memory and a segment. */
    int (*write)(wa_backend *b, int device, const wa_mem *mem, uint64_t offset,
                 const void *src, size_t len, wd_error *err);
    int (*read)(wa_backend *b, int device, const wa_mem *mem, uint64_t offset,
                void *dst, size_t len, wd_error *err);
    int (*describe)(wa_backend *b, int device, wa_device_info *out);
    /* Bytes free on the device now: cuMemGetInfo's (other processes' memory
     * counts), or the capacity less what the backend holds. Apart from
     * describe, which attach calls: this one asks the driver. */
    uint64_t (*free_bytes)(wa_backend *b, int device);
    void (*destroy)(wa_backend *b);

    /* Expandable segments (NULL where the backend cannot): an address range
     * reserved up front, into which pages of physical memory are mapped and
     * unmapped one by one (CUDA's cuMemAddressReserve/cuMemCreate/cuMemMap).
     * page_map makes `size` bytes (a multiple of 2 MiB, CUDA's granularity)
     * at va + offset; -ENOMEM when the device cannot hold them. */
    int (*va_reserve)(wa_backend *b, int device, uint64_t size, wa_mem *va, wd_error *err);
    void (*va_release)(wa_backend *b, int device, wa_mem *va);
    int (*page_map)(wa_backend *b, int device, const wa_mem *va, uint64_t offset, uint64_t size, wa_mem *page,
                    wd_error *err);
    void (*page_unmap)(wa_backend *b, int device, const wa_mem *va, wa_mem *page);

    /* Sleep (NULL where the backend cannot): evict gives mem's physical
     * memory back to the device and keeps its addresses (addr and size stay,
     * fd is -1; host: the range is PROT_NONE); restore puts new memory of
     * undefined contents there. mem is a classic segment or one physical
     * allocation of an expandable one; seg_free and page_unmap take evicted
     * memory too. */
    void (*evict)(wa_backend *b, int device, wa_mem *mem);
    int (*restore)(wa_backend *b, int device, wa_mem *mem, wd_error *err);

    /* Staging for devices the CPU cannot address (NULL on host and fake):
     * pinned host memory, and asynchronous copies into segments on numbered
     * lanes (a stream per device and lane; copies on one lane run in order).
     * copy_wait returns once every copy queued on the lane is done. These are
     * called from the loader's threads, each on lanes of its own. */
    int (*pinned_alloc)(wa_backend *b, size_t size, void **out, wd_error *err);
    void (*pinned_free)(wa_backend *b, void *p, size_t size);
    int (*copy_async)(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, const void *src, size_t len,
                      unsigned lane, wd_error *err);
    int (*copy_wait)(wa_backend *b, int device, unsigned lane, wd_error *err);
    /* Pins host memory the caller keeps (a sleeping model's host copy), so
     * that copy_async reads it straight from where it is; unpin before
     * unmapping it. NULL where there is no staging. */
    int (*host_register)(wa_backend *b, void *p, size_t size, wd_error *err);
    void (*host_unregister)(wa_backend *b, void *p);

    /* Memory that outlived the process that made it (a daemon restart: the
     * descriptors came back from systemd's fd store): fd is a shareable
     * handle of `size` bytes, as mem.fd was. With va NULL it becomes a
     * classic segment of its own (as seg_alloc); else it is mapped at
     * va + offset (as page_map). Takes fd on success (out->fd is fd); an
     * fd that is not such memory is -EBADF; NULL where the backend's memory
     * cannot outlive its maker (cuda-ipc, fake). */
    int (*import)(wa_backend *b, int device, int fd, uint64_t size, const wa_mem *va, uint64_t offset, wa_mem *out,
                  wd_error *err);

    /* WA_SHARE_IPC only: the WA_IPC_HANDLE_BYTES bytes a worker opens mem with. */
    void (*ipc_handle)(wa_backend *b, const wa_mem *mem, unsigned char *out);
};

typedef struct wa_backend_opts {
    const char *name;        /* "fake", "host", "cuda", "cuda-ipc" */
    int n_devices;           /* fake/host: emulated devices */
    uint64_t capacity;       /* bytes per device; cuda: 0 = what is free at start */
    const char *devices;     /* cuda: "0,1" or UUIDs; NULL or "" = every GPU */
    /* cuda: memory this process alone uses (the PyTorch front end): no
     * shareable handles (a descriptor per segment would run a process out
     * of them), the primary context's flags left as its owner set them, and
     * the device synchronised before memory goes back, since kernels queued
     * on it may still use it. */
    bool private_memory;
} wa_backend_opts;

/* Makes the backend named in opts. -ENOTSUP for one not built in. */
int wa_backend_create(const wa_backend_opts *opts, wa_backend **out, wd_error *err);
static inline void wa_backend_destroy(wa_backend *b)
{
    if (b)
        b->destroy(b);
}
/* "fake host" (+ "cuda cuda-ipc" where built): for --help and errors. */
const char *wa_backend_names(void);

int wa_backend_fake_create(int n_devices, uint64_t capacity, wa_backend **out, wd_error *err);
int wa_backend_host_create(int n_devices, uint64_t capacity, wa_backend **out, wd_error *err);
#ifdef WD_WITH_CUDA
int wa_backend_cuda_create(const wa_backend_opts *opts, wa_backend **out, wd_error *err);
int wa_backend_cuda_ipc_create(const wa_backend_opts *opts, wa_backend **out, wd_error *err);
#endif

#endif
