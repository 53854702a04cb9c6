/* The GPU backends.
 *   cuda      segments from cuMemCreate with the POSIX file-descriptor handle
 *             type, mapped into a reserved address range in the daemon; each
 *             segment's exported fd is kept for its life (a worker maps a dup).
 *             Expandable segments map such allocations page by page.
 *   cuda-ipc  segments from cuMemAlloc, shared with the legacy IPC handle
 *             (what PyTorch's own CUDA IPC uses); no expandable segments.
 * Both stage loads through pinned host memory with asynchronous copies on
 * numbered lanes (one stream per device and lane). */
#include "allocator/backend.h"
#include "common/cuda_driver.h"

#include <ctype.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

_Static_assert(sizeof(CUipcMemHandle) == WA_IPC_HANDLE_BYTES, "the IPC handle's size");

#define MAX_LANES 512 /* two a reader thread, at most 256 threads */

typedef struct cuda_device {
    int ordinal;
    CUdevice dev;
    CUcontext ctx;
    size_t granularity;
    uint64_t capacity;
    char name[64], uuid[48];
    CUstream lanes[MAX_LANES];
} cuda_device;

typedef struct cuda_backend {
    wa_backend base;
    const wd_cuda *cu;
    cuda_device *dev;
    pthread_mutex_t lock;
    bool private_memory; /* wa_backend_opts' */
} cuda_backend;

#define CU(call, what)                                                   \
    do {                                                                 \
        CUresult r_ = (call);                                            \
        if (r_ != CUDA_SUCCESS) {                                        \
            rc = wd_cuda_error(r_, what, err);                           \
            goto fail;                                                   \
        }                                                                \
    } while (0)

static cuda_device *device_of(wa_backend *b, int device)
{
    cuda_backend *c = (cuda_backend *)b;
    c->cu->cuCtxSetCurrent(c->dev[device].ctx);
    return &c->dev[device];
}

/* ---- cuda: VMM allocations with exported descriptors ---------------------- */

static CUmemAllocationProp vmm_prop(const cuda_device *d, bool shareable)
{
    CUmemAllocationProp prop = {0};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = shareable ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = d->ordinal;
    return prop;
}

/* Physical memory of `size` bytes mapped at va: made here and exported
 * (shared < 0), or an allocation another process made and exported (an
 * earlier daemon's, from systemd's fd store), imported; mem gets the handle
 * (priv), the descriptor workers are given, and the address. An imported
 * handle cannot be exported again: its descriptor stays the one shared. */
static int vmm_map(cuda_backend *c, cuda_device *d, CUdeviceptr va, uint64_t size, int shared, wa_mem *mem,
                   wd_error *err)
{
    const wd_cuda *cu = c->cu;
    CUmemAllocationProp prop = vmm_prop(d, !c->private_memory);
    CUmemAccessDesc access = {.location = prop.location, .flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    CUmemGenericAllocationHandle h = 0;
    bool mapped = false;
    int fd = shared, rc;

    if (shared < 0)
        CU(cu->cuMemCreate(&h, size, &prop, 0), "cuMemCreate");
    else
        CU(cu->cuMemImportFromShareableHandle(&h, (void *)(uintptr_t)shared, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
           "cuMemImportFromShareableHandle");
    CU(cu->cuMemMap(va, size, 0, h, 0), "cuMemMap");
    mapped = true;
    CU(cu->cuMemSetAccess(va, size, &access, 1), "cuMemSetAccess");
    if (shared < 0 && !c->private_memory)
        CU(cu->cuMemExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
           "cuMemExportToShareableHandle");
    *mem = (wa_mem){.addr = (uint64_t)va, .size = size, .fd = fd, .priv = (void *)(uintptr_t)h};
    return 0;
fail:
    if (mapped)
        cu->cuMemUnmap(va, size);
    if (h)
        cu->cuMemRelease(h);
    return rc;
}

/* The memory under mem goes (the range stays). Kernels of this process may
 * still use it: with private memory, the device finishes them first. A
 * handle of 0 is evicted memory, gone already. */
static void vmm_evict(wa_backend *b, int device, wa_mem *mem)
{
    cuda_backend *c = (cuda_backend *)b;

    device_of(b, device);
    if (mem->priv) {
        if (c->private_memory)
            c->cu->cuCtxSynchronize();
        c->cu->cuMemUnmap((CUdeviceptr)mem->addr, mem->size);
        c->cu->cuMemRelease((CUmemGenericAllocationHandle)(uintptr_t)mem->priv);
    }
    if (mem->fd >= 0)
        close(mem->fd);
    mem->fd = -1;
    mem->priv = NULL;
}

static int vmm_restore(wa_backend *b, int device, wa_mem *mem, wd_error *err)
{
    return vmm_map((cuda_backend *)b, device_of(b, device), (CUdeviceptr)mem->addr, mem->size, -1, mem, err);
}

static void vmm_unmap(cuda_backend *c, int device, wa_mem *mem)
{
    vmm_evict(&c->base, device, mem);
    mem->size = 0;
}

static int vmm_va_reserve(wa_backend *b, int device, uint64_t size, wa_mem *va, wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    cuda_device *d = device_of(b, device);
    CUdeviceptr p = 0;
    int rc;

    CU(c->cu->cuMemAddressReserve(&p, size, d->granularity, 0, 0), "cuMemAddressReserve");
    *va = (wa_mem){.addr = (uint64_t)p, .size = size, .fd = -1};
    return 0;
fail:
    return rc;
}

static void vmm_va_release(wa_backend *b, int device, wa_mem *va)
{
    cuda_backend *c = (cuda_backend *)b;

    device_of(b, device);
    c->cu->cuMemAddressFree((CUdeviceptr)va->addr, va->size);
    va->size = 0;
}

/* A classic segment: an address range with one allocation mapped over it. */
static int vmm_seg_alloc(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err)
{
    wa_mem va;
    int rc;

    if ((rc = vmm_va_reserve(b, device, size, &va, err)))
        return rc;
    if ((rc = vmm_map((cuda_backend *)b, device_of(b, device), (CUdeviceptr)va.addr, size, -1, out, err)))
        vmm_va_release(b, device, &va);
    return rc;
}

static void vmm_seg_free(wa_backend *b, int device, wa_mem *mem)
{
    wa_mem va = {.addr = mem->addr, .size = mem->size, .fd = -1};

    vmm_unmap((cuda_backend *)b, device, mem);
    vmm_va_release(b, device, &va);
}

static int vmm_page_map(wa_backend *b, int device, const wa_mem *va, uint64_t offset, uint64_t size, wa_mem *page,
                        wd_error *err)
{
    return vmm_map((cuda_backend *)b, device_of(b, device), (CUdeviceptr)(va->addr + offset), size, -1, page, err);
}

static void vmm_page_unmap(wa_backend *b, int device, const wa_mem *va, wa_mem *page)
{
    (void)va;
    vmm_unmap((cuda_backend *)b, device, page);
}

/* backend.h's import: vmm_map of an allocation another process exported,
 * at va + offset, or in an address range of its own. */
static int vmm_import(wa_backend *b, int device, int fd, uint64_t size, const wa_mem *va, uint64_t offset,
                      wa_mem *out, wd_error *err)
{
    cuda_device *d = device_of(b, device);
    wa_mem own = {.fd = -1};
    int rc;

    if (size % d->granularity)
        return wd_error_set(err, -EBADF, "an allocation of %llu bytes is not whole pages of device %d",
                            (unsigned long long)size, device);
    if (!va) {
        if ((rc = vmm_va_reserve(b, device, size, &own, err)))
            return rc;
        va = &own;
        offset = 0;
    }
    if ((rc = vmm_map((cuda_backend *)b, d, (CUdeviceptr)(va->addr + offset), size, fd, out, err)) && own.size)
        vmm_va_release(b, device, &own);
    return rc;
}

/* ---- cuda-ipc: cuMemAlloc with legacy IPC handles ------------------------- */

static int ipc_seg_alloc(wa_backend *b, int device, uint64_t size, wa_mem *out, wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    CUipcMemHandle *h = malloc(sizeof *h);
    CUdeviceptr p = 0;
    int rc;

    device_of(b, device);
    if (!h)
        return wd_error_set(err, -ENOMEM, "out of host memory");
    CU(c->cu->cuMemAlloc(&p, size), "cuMemAlloc");
    CU(c->cu->cuIpcGetMemHandle(h, p), "cuIpcGetMemHandle");
    *out = (wa_mem){.addr = (uint64_t)p, .size = size, .fd = -1, .priv = h};
    return 0;
fail:
    if (p)
        c->cu->cuMemFree(p);
    free(h);
    return rc;
}

static void ipc_handle(wa_backend *b, const wa_mem *mem, unsigned char *out)
{
    (void)b;
    memcpy(out, ((const CUipcMemHandle *)mem->priv)->reserved, WA_IPC_HANDLE_BYTES);
}

static void ipc_seg_free(wa_backend *b, int device, wa_mem *mem)
{
    cuda_backend *c = (cuda_backend *)b;

    device_of(b, device);
    c->cu->cuMemFree((CUdeviceptr)mem->addr);
    free(mem->priv);
    mem->priv = NULL;
}

/* ---- copies ---------------------------------------------------------------- */

static int cuda_write(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, const void *src, size_t len,
                      wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    int rc;

    device_of(b, device);
    CU(c->cu->cuMemcpyHtoD((CUdeviceptr)(mem->addr + offset), src, len), "cuMemcpyHtoD");
    return 0;
fail:
    return rc;
}

static int cuda_read(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, void *dst, size_t len,
                     wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    int rc;

    device_of(b, device);
    CU(c->cu->cuMemcpyDtoH(dst, (CUdeviceptr)(mem->addr + offset), len), "cuMemcpyDtoH");
    return 0;
fail:
    return rc;
}

static int cuda_pinned_alloc(wa_backend *b, size_t size, void **out, wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    int rc;

    device_of(b, 0);
    CU(c->cu->cuMemHostAlloc(out, size, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc (pinned staging)");
    return 0;
fail:
    return rc;
}

static void cuda_pinned_free(wa_backend *b, void *p, size_t size)
{
    (void)size;
    device_of(b, 0);
    ((cuda_backend *)b)->cu->cuMemFreeHost(p);
}

static int cuda_host_register(wa_backend *b, void *p, size_t size, wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    int rc;

    device_of(b, 0);
    CU(c->cu->cuMemHostRegister(p, size, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister");
    return 0;
fail:
    return rc;
}

static void cuda_host_unregister(wa_backend *b, void *p)
{
    device_of(b, 0);
    ((cuda_backend *)b)->cu->cuMemHostUnregister(p);
}

/* Makes device's context current and gives its lane's stream, made on first use. */
static int lane_stream(wa_backend *b, int device, unsigned lane, CUstream *out, wd_error *err)
{
    cuda_backend *c = (cuda_backend *)b;
    cuda_device *d = device_of(b, device);
    int rc = 0;

    if (lane >= MAX_LANES)
        return wd_error_set(err, -EINVAL, "copy lane %u: at most %d lanes", lane, MAX_LANES);
    pthread_mutex_lock(&c->lock);
    if (!d->lanes[lane])
        CU(c->cu->cuStreamCreate(&d->lanes[lane], CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    *out = d->lanes[lane];
fail:
    pthread_mutex_unlock(&c->lock);
    return rc;
}

static int cuda_copy_async(wa_backend *b, int device, const wa_mem *mem, uint64_t offset, const void *src,
                           size_t len, unsigned lane, wd_error *err)
{
    CUstream s;
    int rc;

    if ((rc = lane_stream(b, device, lane, &s, err)))
        return rc;
    CU(((cuda_backend *)b)->cu->cuMemcpyHtoDAsync((CUdeviceptr)(mem->addr + offset), src, len, s),
       "cuMemcpyHtoDAsync");
    return 0;
fail:
    return rc;
}

static int cuda_copy_wait(wa_backend *b, int device, unsigned lane, wd_error *err)
{
    CUstream s;
    int rc;

    if ((rc = lane_stream(b, device, lane, &s, err)))
        return rc;
    CU(((cuda_backend *)b)->cu->cuStreamSynchronize(s), "cuStreamSynchronize");
    return 0;
fail:
    return rc;
}

/* ---- devices ----------------------------------------------------------------- */

static int cuda_describe(wa_backend *b, int device, wa_device_info *out)
{
    cuda_device *d = &((cuda_backend *)b)->dev[device];

    snprintf(out->name, sizeof out->name, "%s (CUDA device %d)", d->name, d->ordinal);
    snprintf(out->uuid, sizeof out->uuid, "%s", d->uuid);
    out->capacity = d->capacity;
    return 0;
}

static uint64_t cuda_free_bytes(wa_backend *b, int device)
{
    size_t free_b = 0, total = 0;

    device_of(b, device);
    return ((cuda_backend *)b)->cu->cuMemGetInfo(&free_b, &total) == CUDA_SUCCESS ? free_b : 0;
}

static void cuda_destroy(wa_backend *b)
{
    cuda_backend *c = (cuda_backend *)b;

    for (int i = 0; i < b->n_devices; i++) {
        c->cu->cuCtxSetCurrent(c->dev[i].ctx);
        for (int l = 0; l < MAX_LANES; l++)
            if (c->dev[i].lanes[l])
                c->cu->cuStreamDestroy(c->dev[i].lanes[l]);
        if (c->dev[i].ctx)
            c->cu->cuDevicePrimaryCtxRelease(c->dev[i].dev);
    }
    pthread_mutex_destroy(&c->lock);
    free(c->dev);
    free(c);
}

static void format_uuid(const CUuuid *u, char *out, size_t len)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, len, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
             b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* Which ordinals "0,1" or "GPU-1b2c..." (a UUID or its unique prefix) name;
 * "" is every device. */
static int select_devices(const wd_cuda *cu, const char *list, int *ords, int *n, wd_error *err)
{
    int count = 0, rc;
    char uuids[64][48];

    *n = 0;
    CU(cu->cuDeviceGetCount(&count), "cuDeviceGetCount");
    if (count == 0)
        return wd_error_set(err, -ENODEV, "no CUDA device is visible");
    if (count > 64)
        count = 64;
    for (int i = 0; i < count; i++) {
        CUdevice dev;
        CUuuid u;
        CU(cu->cuDeviceGet(&dev, i), "cuDeviceGet");
        CU(cu->cuDeviceGetUuid(&u, dev), "cuDeviceGetUuid");
        format_uuid(&u, uuids[i], sizeof uuids[i]);
    }
    if (!list || !*list) {
        for (int i = 0; i < count; i++)
            ords[(*n)++] = i;
        return 0;
    }
    for (const char *p = list; *p;) {
        char item[64];
        size_t len = strcspn(p, ",");
        int found = -1;
        snprintf(item, sizeof item, "%.*s", (int)(len < sizeof item ? len : sizeof item - 1), p);
        if (isdigit((unsigned char)item[0])) {
            char *end;
            long v = strtol(item, &end, 10);
            if (!*end && v >= 0 && v < count)
                found = (int)v;
        } else {
            for (int i = 0; i < count; i++)
                if (item[0] && strncasecmp(uuids[i], item, strlen(item)) == 0) {
                    if (found >= 0)
                        return wd_error_set(err, -EINVAL, "device \"%s\" matches more than one GPU", item);
                    found = i;
                }
        }
        if (found < 0)
            return wd_error_set(err, -ENODEV, "no CUDA device \"%s\" (%d visible: 0 to %d, or a UUID such as %s)",
                                item, count, count - 1, uuids[0]);
        for (int i = 0; i < *n; i++)
            if (ords[i] == found)
                return wd_error_set(err, -EINVAL, "device \"%s\" is named twice", item);
        ords[(*n)++] = found;
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
fail:
    return rc;
}

static int cuda_create(const wa_backend_opts *opts, bool vmm, wa_backend **out, wd_error *err)
{
    const wd_cuda *cu;
    cuda_backend *c = NULL;
    int ords[64], n, rc;

    if ((rc = wd_cuda_load(&cu, err)) || (rc = select_devices(cu, opts->devices, ords, &n, err)))
        return rc;
    if (!(c = calloc(1, sizeof *c)) || !(c->dev = calloc((size_t)n, sizeof *c->dev))) {
        free(c);
        return wd_error_set(err, -ENOMEM, "out of host memory");
    }
    pthread_mutex_init(&c->lock, NULL);
    c->cu = cu;
    c->private_memory = opts->private_memory && vmm;
    c->base = (wa_backend){
        .name = vmm ? "cuda" : "cuda-ipc",
        .share = vmm ? WA_SHARE_VMM : WA_SHARE_IPC,
        .ipc_handle = vmm ? NULL : ipc_handle,
        .import = vmm ? vmm_import : NULL, /* cuMemAlloc memory dies with its maker */
        .seg_alloc = vmm ? vmm_seg_alloc : ipc_seg_alloc,
        .seg_free = vmm ? vmm_seg_free : ipc_seg_free,
        .write = cuda_write,
        .read = cuda_read,
        .describe = cuda_describe,
        .free_bytes = cuda_free_bytes,
        .destroy = cuda_destroy,
        .pinned_alloc = cuda_pinned_alloc,
        .pinned_free = cuda_pinned_free,
        .copy_async = cuda_copy_async,
        .copy_wait = cuda_copy_wait,
        .host_register = cuda_host_register,
        .host_unregister = cuda_host_unregister,
    };
    for (int i = 0; i < n; i++) {
        cuda_device *d = &c->dev[i];
        CUmemAllocationProp prop;
        CUuuid u;
        size_t free_b = 0, total = 0;
        int vmm_ok = 0, fd_ok = 0;

        d->ordinal = ords[i];
        CU(cu->cuDeviceGet(&d->dev, d->ordinal), "cuDeviceGet");
        CU(cu->cuDeviceGetName(d->name, sizeof d->name, d->dev), "cuDeviceGetName");
        CU(cu->cuDeviceGetUuid(&u, d->dev), "cuDeviceGetUuid");
        format_uuid(&u, d->uuid, sizeof d->uuid);
        /* A thread waiting for its copies sleeps instead of spinning (the
         * driver's default with fewer contexts than CPUs): a daemon should
         * not burn CPUs while it waits. Loads ran as fast either way. */
        if (!c->private_memory)
            CU(cu->cuDevicePrimaryCtxSetFlags(d->dev, CU_CTX_SCHED_BLOCKING_SYNC), "cuDevicePrimaryCtxSetFlags");
        CU(cu->cuDevicePrimaryCtxRetain(&d->ctx, d->dev), "cuDevicePrimaryCtxRetain");
        c->base.n_devices = i + 1; /* what destroy must release */
        CU(cu->cuCtxSetCurrent(d->ctx), "cuCtxSetCurrent");
        CU(cu->cuMemGetInfo(&free_b, &total), "cuMemGetInfo");
        /* All of what is free now, unless a smaller capacity was asked for. */
        d->capacity = opts->capacity && opts->capacity < free_b ? opts->capacity : free_b;
        if (vmm) {
            CU(cu->cuDeviceGetAttribute(&vmm_ok, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, d->dev),
               "cuDeviceGetAttribute");
            CU(cu->cuDeviceGetAttribute(&fd_ok, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                                        d->dev), "cuDeviceGetAttribute");
            if (!vmm_ok || !fd_ok) {
                rc = wd_error_set(err, -ENOTSUP, "%s (device %d) lacks %s; use --backend cuda-ipc", d->name,
                                  d->ordinal, !vmm_ok ? "virtual memory management" : "POSIX-fd memory handles");
                goto fail;
            }
            prop = vmm_prop(d, !c->private_memory);
            CU(cu->cuMemGetAllocationGranularity(&d->granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
               "cuMemGetAllocationGranularity");
        }
    }
    if (vmm) {
        c->base.va_reserve = vmm_va_reserve;
        c->base.va_release = vmm_va_release;
        c->base.page_map = vmm_page_map;
        c->base.page_unmap = vmm_page_unmap;
        c->base.evict = vmm_evict;
        c->base.restore = vmm_restore;
    }
    *out = &c->base;
    return 0;
fail:
    cuda_destroy(&c->base);
    return rc;
}

int wa_backend_cuda_create(const wa_backend_opts *opts, wa_backend **out, wd_error *err)
{
    return cuda_create(opts, true, out, err);
}

int wa_backend_cuda_ipc_create(const wa_backend_opts *opts, wa_backend **out, wd_error *err)
{
    return cuda_create(opts, false, out, err);
}
