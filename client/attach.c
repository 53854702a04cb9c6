/* libweightd-client's attach: the daemon's stream of descriptors, handles
 * and tensors (daemon/attach.c says what it sends), imported and mapped.
 *
 *   memfd     (host)      each handle's pieces mmap'ed side by side into one
 *                         reserved range per device; read-only unless writable
 *   cuda-vmm  (cuda)      each descriptor imported as it arrives (so that its
 *                         fd closes at once), then cuMemMap'ed side by side into
 *                         one cuMemAddressReserve range per device, and one
 *                         cuMemSetAccess (PROT_READ unless writable) over it
 *   cuda-ipc  (cuda-ipc)  cuIpcOpenMemHandle per descriptor; a handle is an
 *                         offset into what that opens
 * The CUDA driver is opened at run time (common/cuda_driver.c, the daemon's
 * own shim); the library works without it on the host backend. */
#include "client/internal.h"

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/checksum.h"
#include "common/grow.h"
#ifdef WD_WITH_CUDA
#include "common/cuda_driver.h"
#endif

#define HOST_PAGE 4096u

typedef enum share_kind { KIND_MEMFD, KIND_VMM, KIND_IPC } share_kind;

typedef struct att_device {
    int device;               /* the daemon's */
    int cuda;                 /* this process's ordinal; -1 on host */
    uint64_t granularity;     /* of its mappings */
    uint64_t va_bytes;        /* the range its handles are mapped into */
    uintptr_t va;
#ifdef WD_WITH_CUDA
    CUdevice dev;
    CUcontext ctx;            /* its primary context, retained */
#endif
} att_device;

typedef struct att_desc {
    size_t dev;               /* index into devs */
    uint64_t bytes;
    int fd;                   /* memfd: until mapped; -1 after */
#ifdef WD_WITH_CUDA
    CUmemGenericAllocationHandle vmm; /* imported; released once mapped */
    CUipcMemHandle ipc;
    CUdeviceptr opened;       /* ipc: what cuIpcOpenMemHandle gave */
#endif
} att_desc;

typedef struct att_piece {
    size_t desc;
    uint64_t offset, bytes, at;
    bool mapped;
} att_piece;

struct wdc_attachment {
    wdc_client *client;       /* the connection it answers sleep and wake on; NULL once closed */
    wdc_attachment *next;     /* the client's list */
    int state;                /* 0 mapped, WDC_ASLEEP, or a negative errno: a wake that failed */
    size_t woken_descs;       /* wake: descriptors received again so far */
    uint64_t lease;
    char token[33];           /* the lease's secret: takes it again after a daemon restart */
    share_kind kind;
    bool writable;
    att_device *devs;
    size_t n_devs;
    att_desc *descs;
    size_t n_descs, cap_descs;
    att_piece *pieces;
    size_t n_pieces, cap_pieces;
    wdc_handle *handles;
    uint64_t *handle_ids;     /* the daemon's numbers, rising */
    size_t *handle_piece;     /* first piece of each; one more entry at the end */
    size_t n_handles, cap_handles;
    wdc_tensor *tensors;
    size_t n_tensors, cap_tensors;
    wdc_part *parts;
    size_t n_parts, cap_parts;
    uint64_t *dims;
    size_t n_dims, cap_dims;
    size_t *sorted;           /* tensor indices by name, for find */
    char *info;
    double setup_seconds;     /* the driver and the devices' contexts */
    double import_seconds;
    double read_seconds;      /* reading and parsing the messages */
    double table_seconds;     /* taking in the handles and tensors */
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- CUDA ----------------------------------------------------------------------- */

#ifdef WD_WITH_CUDA
#define CU(c, call, what)                                                            \
    do {                                                                             \
        CUresult r_ = (call);                                                        \
        if (r_ != CUDA_SUCCESS) {                                                    \
            wd_error e_ = {0};                                                       \
            rc = wdc__fail(c, wd_cuda_error(r_, what, &e_), "%s", e_.msg);           \
            goto out;                                                                \
        }                                                                            \
    } while (0)

static const wd_cuda *cuda(wdc_client *c, int *rc)
{
    const wd_cuda *cu = NULL;
    wd_error err = {0};

    if ((*rc = wd_cuda_load(&cu, &err)))
        wdc__fail(c, *rc, "%s", err.msg);
    return cu;
}

/* The local ordinal of the GPU whose UUID is uuid, with its primary context. */
static int cuda_device(wdc_client *c, const char *uuid, att_device *d)
{
    const wd_cuda *cu;
    int n = 0, rc;
    CUmemAllocationProp prop = {0};
    size_t gran = 0;
    CUdevice dev;

    if (!(cu = cuda(c, &rc)))
        return rc;
    CU(c, cu->cuDeviceGetCount(&n), "cuDeviceGetCount");
    for (int i = 0; i < n; i++) {
        CUuuid u;
        char text[48];
        const unsigned char *b = (const unsigned char *)u.bytes;
        CU(c, cu->cuDeviceGet(&dev, i), "cuDeviceGet");
        CU(c, cu->cuDeviceGetUuid(&u, dev), "cuDeviceGetUuid");
        snprintf(text, sizeof text, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
        if (strcasecmp(text, uuid) == 0) {
            d->cuda = i;
            d->dev = dev;
            break;
        }
    }
    if (d->cuda < 0)
        return wdc__fail(c, -ENODEV, "the daemon's device %d (%s) is not visible in this process (CUDA_VISIBLE_DEVICES?)",
                         d->device, uuid);
    CU(c, cu->cuDevicePrimaryCtxRetain(&d->ctx, d->dev), "cuDevicePrimaryCtxRetain");
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = d->cuda;
    CU(c, cu->cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
       "cuMemGetAllocationGranularity");
    d->granularity = gran;
    rc = 0;
out:
    return rc;
}

/* Runs with d's context current, the caller's put back after. */
static int push(wdc_client *c, const att_device *d)
{
    const wd_cuda *cu;
    int rc;

    if (!(cu = cuda(c, &rc)))
        return rc;
    CU(c, cu->cuCtxPushCurrent(d->ctx), "cuCtxPushCurrent");
out:
    return rc;
}

static void pop(void)
{
    const wd_cuda *cu;
    wd_error err;
    CUcontext ignored;

    if (wd_cuda_load(&cu, &err) == 0)
        cu->cuCtxPopCurrent(&ignored);
}
#endif

/* ---- receiving -------------------------------------------------------------------- */

static size_t device_index(const wdc_attachment *a, int device)
{
    for (size_t i = 0; i < a->n_devs; i++)
        if (a->devs[i].device == device)
            return i;
    return SIZE_MAX;
}

static int get_u64(wdc_client *c, const cJSON *o, const char *key, uint64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0)
        return wdc__fail(c, -EPROTO, "weightd's attach: \"%s\" is missing or not a count", key);
    *out = (uint64_t)v->valuedouble;
    return 0;
}

static int on_devices(wdc_client *c, wdc_attachment *a, const cJSON *ev, const cJSON *list)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(ev, "handle_type"), *o;
    int rc;

    if (a->devs)
        return wdc__fail(c, -EPROTO, "weightd's attach: two device lists");
    if (!cJSON_IsString(type))
        return wdc__fail(c, -EPROTO, "weightd's attach: no handle_type");
    if (strcmp(type->valuestring, "memfd") == 0)
        a->kind = KIND_MEMFD;
    else if (strcmp(type->valuestring, "cuda-vmm") == 0)
        a->kind = KIND_VMM;
    else if (strcmp(type->valuestring, "cuda-ipc") == 0)
        a->kind = KIND_IPC;
    else
        return wdc__fail(c, -ENOTSUP, "weightd serves \"%s\" handles, which this library cannot map",
                         type->valuestring);
#ifndef WD_WITH_CUDA
    if (a->kind != KIND_MEMFD)
        return wdc__fail(c, -ENOTSUP, "this libweightd-client was built without CUDA; it cannot map %s handles",
                         type->valuestring);
#endif
    if (!(a->devs = calloc((size_t)cJSON_GetArraySize(list) + 1, sizeof *a->devs)))
        return wdc__fail(c, -ENOMEM, "out of memory");
    cJSON_ArrayForEach(o, list)
    {
        att_device *d = &a->devs[a->n_devs];
        const cJSON *uuid = cJSON_GetObjectItemCaseSensitive(o, "uuid");
        uint64_t dev;
        if ((rc = get_u64(c, o, "device", &dev)))
            return rc;
        if (!cJSON_IsString(uuid))
            return wdc__fail(c, -EPROTO, "weightd's attach: a device without its uuid");
        if (device_index(a, (int)dev) != SIZE_MAX)
            return wdc__fail(c, -EPROTO, "weightd's attach: device %llu listed twice", (unsigned long long)dev);
        d->device = (int)dev;
        d->cuda = -1;
        d->granularity = HOST_PAGE;
        a->n_devs++;
#ifdef WD_WITH_CUDA
        if (a->kind != KIND_MEMFD && (rc = cuda_device(c, uuid->valuestring, d)))
            return rc;
#endif
    }
    return 0;
}

/* Descriptor index's fd (taken): a memfd is kept for mapping, its true
 * size bounding what may be mapped of it whatever the message says (a
 * mapping past a memfd's end faults when read); a cuda one is imported at
 * once, so that the descriptor closes. */
static int take_descriptor(wdc_client *c, wdc_attachment *a, att_desc *d, uint64_t index, int fd)
{
    int rc = 0;

    if (a->kind == KIND_MEMFD) {
        struct stat st;
        d->fd = fd;
        if (fstat(d->fd, &st) < 0 || (uint64_t)st.st_size < d->bytes)
            return wdc__fail(c, -EPROTO, "weightd's attach: descriptor %llu is smaller than it says",
                             (unsigned long long)index);
        return 0;
    }
#ifdef WD_WITH_CUDA
    {
        const wd_cuda *cu = cuda(c, &rc);
        double t0 = now();
        CUresult r;
        if (!cu || (rc = push(c, &a->devs[d->dev]))) {
            close(fd);
            return rc;
        }
        r = cu->cuMemImportFromShareableHandle(&d->vmm, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
        pop();
        /* Imported or not, the descriptor has done its work. */
        close(fd);
        a->import_seconds += now() - t0;
        if (r != CUDA_SUCCESS) {
            wd_error e = {0};
            rc = wdc__fail(c, wd_cuda_error(r, "cuMemImportFromShareableHandle", &e), "%s", e.msg);
        }
    }
#else
    close(fd);
    rc = wdc__fail(c, -ENOTSUP, "built without CUDA");
#endif
    return rc;
}

static int on_descriptors(wdc_client *c, wdc_attachment *a, const cJSON *list)
{
    size_t n = (size_t)cJSON_GetArraySize(list), i = 0;
    int fds[WP_MAX_FDS];
    const cJSON *o;
    int rc = 0;

    if (!a->devs)
        return wdc__fail(c, -EPROTO, "weightd's attach: descriptors before the devices");
    if (a->kind != KIND_IPC) {
        /* Their descriptors came with this message, in its order. */
        size_t got = n > WP_MAX_FDS ? 0 : wp_reader_take_fds(&c->rd, fds, n);
        if (got != n || n > WP_MAX_FDS) {
            while (got)
                close(fds[--got]);
            return wdc__fail(c, -EPROTO, "weightd's attach: a message lists %zu descriptors but brought fewer", n);
        }
    }
    if (WD_GROW(a->descs, a->cap_descs, a->n_descs + n, 16)) {
        rc = wdc__fail(c, -ENOMEM, "out of memory");
        goto out;
    }
    cJSON_ArrayForEach(o, list)
    {
        att_desc *d = &a->descs[a->n_descs];
        uint64_t index, dev;
        memset(d, 0, sizeof *d); /* what release looks at, for an entry not taken in full */
        if ((rc = get_u64(c, o, "descriptor", &index)) || (rc = get_u64(c, o, "device", &dev)) ||
            (rc = get_u64(c, o, "bytes", &d->bytes)))
            goto out;
        if (index != a->n_descs || (d->dev = device_index(a, (int)dev)) == SIZE_MAX) {
            rc = wdc__fail(c, -EPROTO, "weightd's attach: descriptor %llu out of order or on an unknown device",
                           (unsigned long long)index);
            goto out;
        }
        d->fd = -1;
        if (a->kind != KIND_IPC) {
            rc = take_descriptor(c, a, d, index, fds[i]);
            fds[i++] = -1;
            if (rc) {
                a->n_descs++; /* closed with the others */
                goto out;
            }
        }
#ifdef WD_WITH_CUDA
        else {
            const cJSON *hex = cJSON_GetObjectItemCaseSensitive(o, "ipc");
            const char *h = cJSON_IsString(hex) ? hex->valuestring : "";
            if (strlen(h) != 2 * sizeof d->ipc.reserved) {
                rc = wdc__fail(c, -EPROTO, "weightd's attach: an IPC handle is not %zu hex digits",
                               2 * sizeof d->ipc.reserved);
                goto out;
            }
            for (size_t b = 0; b < sizeof d->ipc.reserved; b++) {
                unsigned v;
                if (!isxdigit((unsigned char)h[2 * b]) || !isxdigit((unsigned char)h[2 * b + 1]) ||
                    sscanf(h + 2 * b, "%2x", &v) != 1) {
                    rc = wdc__fail(c, -EPROTO, "weightd's attach: an IPC handle is not hex");
                    goto out;
                }
                d->ipc.reserved[b] = (char)v;
            }
        }
#endif
        a->n_descs++;
    }
out:
    for (; i < n && a->kind != KIND_IPC; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return rc;
}

static int on_handles(wdc_client *c, wdc_attachment *a, const cJSON *list)
{
    const cJSON *o, *p;
    int rc;

    cJSON_ArrayForEach(o, list)
    {
        const cJSON *pieces = cJSON_GetObjectItemCaseSensitive(o, "pieces");
        wdc_handle *h;
        uint64_t id, dev, bytes, end = 0;
        size_t di;
        if ((rc = get_u64(c, o, "handle", &id)) || (rc = get_u64(c, o, "device", &dev)) ||
            (rc = get_u64(c, o, "bytes", &bytes)))
            return rc;
        if ((di = device_index(a, (int)dev)) == SIZE_MAX || !cJSON_IsArray(pieces) || !bytes ||
            (a->n_handles && id <= a->handle_ids[a->n_handles - 1]))
            return wdc__fail(c, -EPROTO, "weightd's attach: handle %llu is malformed", (unsigned long long)id);
        if (a->n_handles == a->cap_handles) {
            size_t cap = a->cap_handles ? 2 * a->cap_handles : 16;
            wdc_handle *handles = realloc(a->handles, cap * sizeof *handles);
            uint64_t *ids = handles ? realloc(a->handle_ids, cap * sizeof *ids) : NULL;
            size_t *first = ids ? realloc(a->handle_piece, (cap + 1) * sizeof *first) : NULL;
            if (handles)
                a->handles = handles;
            if (ids)
                a->handle_ids = ids;
            if (!first)
                return wdc__fail(c, -ENOMEM, "out of memory");
            a->handle_piece = first;
            a->cap_handles = cap;
        }
        h = &a->handles[a->n_handles];
        *h = (wdc_handle){.device = (int)dev, .cuda_device = a->devs[di].cuda, .bytes = bytes};
        a->handle_ids[a->n_handles] = id;
        a->handle_piece[a->n_handles] = a->n_pieces;
        cJSON_ArrayForEach(p, pieces)
        {
            att_piece pc = {0};
            uint64_t desc;
            if ((rc = get_u64(c, p, "descriptor", &desc)) || (rc = get_u64(c, p, "offset", &pc.offset)) ||
                (rc = get_u64(c, p, "bytes", &pc.bytes)) || (rc = get_u64(c, p, "at", &pc.at)))
                return rc;
            pc.desc = (size_t)desc;
            /* The pieces tile the handle, in order (every byte of it is
             * mapped), each on the handle's device; whole allocations
             * on cuda (the driver maps nothing less), one on cuda-ipc;
             * page-aligned for mmap. */
            if (desc >= a->n_descs || a->descs[desc].dev != di || pc.at > bytes || pc.bytes > bytes - pc.at ||
                !pc.bytes || pc.at != end || (a->kind == KIND_VMM && (pc.offset || pc.bytes != a->descs[desc].bytes)) ||
                (a->kind == KIND_IPC && (pc.at || pc.offset > a->descs[desc].bytes ||
                                         pc.bytes > a->descs[desc].bytes - pc.offset || a->n_pieces > a->handle_piece[a->n_handles])) ||
                (a->kind == KIND_MEMFD && (pc.offset % HOST_PAGE || pc.at % HOST_PAGE || pc.offset > a->descs[desc].bytes ||
                                           pc.bytes > a->descs[desc].bytes - pc.offset)))
                return wdc__fail(c, -EPROTO, "weightd's attach: a piece of handle %llu does not fit it",
                                 (unsigned long long)id);
            if (WD_GROW(a->pieces, a->cap_pieces, a->n_pieces + 1, 16))
                return wdc__fail(c, -ENOMEM, "out of memory");
            a->pieces[a->n_pieces++] = pc;
            end = pc.at + pc.bytes;
        }
        if (end != bytes)
            return wdc__fail(c, -EPROTO, "weightd's attach: the pieces of handle %llu do not cover it",
                             (unsigned long long)id);
        a->n_handles++;
        a->handle_piece[a->n_handles] = a->n_pieces;
    }
    return 0;
}

static size_t handle_index(const wdc_attachment *a, uint64_t id)
{
    size_t lo = 0, hi = a->n_handles;

    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a->handle_ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < a->n_handles && a->handle_ids[lo] == id ? lo : SIZE_MAX;
}

static int on_tensors(wdc_client *c, wdc_attachment *a, const cJSON *list)
{
    const cJSON *o, *v;
    int rc;

    cJSON_ArrayForEach(o, list)
    {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "name");
        const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(o, "dtype");
        const cJSON *shape = cJSON_GetObjectItemCaseSensitive(o, "shape");
        const cJSON *parts = cJSON_GetObjectItemCaseSensitive(o, "parts");
        wdc_tensor *t;
        if (!cJSON_IsString(name) || !cJSON_IsString(dtype) || !cJSON_IsArray(shape) || !cJSON_IsArray(parts))
            return wdc__fail(c, -EPROTO, "weightd's attach: a tensor entry is malformed");
        if (WD_GROW(a->tensors, a->cap_tensors, a->n_tensors + 1, 256))
            return wdc__fail(c, -ENOMEM, "out of memory");
        t = &a->tensors[a->n_tensors];
        memset(t, 0, sizeof *t);
        /* Pointers into dims and parts are set once every tensor is in;
         * until then these hold indices. */
        t->shape = (const uint64_t *)(uintptr_t)a->n_dims;
        t->parts = (const wdc_part *)(uintptr_t)a->n_parts;
        if (!(t->name = strdup(name->valuestring)) || !(t->dtype = strdup(dtype->valuestring)))
            return wdc__fail(c, -ENOMEM, "out of memory");
        a->n_tensors++; /* owns its strings from here */
        if ((rc = get_u64(c, o, "bytes", &t->bytes)))
            return rc;
        if ((v = cJSON_GetObjectItemCaseSensitive(o, "checksum"))) {
            if (!cJSON_IsString(v) || wd_sum_parse(v->valuestring, &t->checksum))
                return wdc__fail(c, -EPROTO, "weightd's attach: tensor \"%s\" has a malformed checksum", t->name);
            t->has_checksum = 1;
        }
        cJSON_ArrayForEach(v, shape)
        {
            if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0)
                return wdc__fail(c, -EPROTO, "weightd's attach: tensor \"%s\" has a bad shape", t->name);
            if (WD_GROW(a->dims, a->cap_dims, a->n_dims + 1, 1024))
                return wdc__fail(c, -ENOMEM, "out of memory");
            a->dims[a->n_dims++] = (uint64_t)v->valuedouble;
            t->ndim++;
        }
        cJSON_ArrayForEach(v, parts)
        {
            wdc_part p = {0};
            uint64_t dev, handle;
            size_t h;
            if ((rc = get_u64(c, v, "device", &dev)) || (rc = get_u64(c, v, "handle", &handle)) ||
                (rc = get_u64(c, v, "offset", &p.handle_offset)) || (rc = get_u64(c, v, "bytes", &p.bytes)) ||
                (rc = get_u64(c, v, "tensor_offset", &p.tensor_offset)))
                return rc;
            if ((h = handle_index(a, handle)) == SIZE_MAX || a->handles[h].device != (int)dev ||
                p.handle_offset > a->handles[h].bytes || p.bytes > a->handles[h].bytes - p.handle_offset ||
                p.tensor_offset > t->bytes || p.bytes > t->bytes - p.tensor_offset)
                return wdc__fail(c, -EPROTO, "weightd's attach: a part of tensor \"%s\" lies outside its handle",
                                 t->name);
            p.device = (int)dev;
            p.cuda_device = a->handles[h].cuda_device;
            p.handle = h;
            if (WD_GROW(a->parts, a->cap_parts, a->n_parts + 1, 256))
                return wdc__fail(c, -ENOMEM, "out of memory");
            a->parts[a->n_parts++] = p;
            t->n_parts++;
        }
    }
    return 0;
}

/* ---- mapping ------------------------------------------------------------------------ */

static uint64_t round_up(uint64_t v, uint64_t to)
{
    return (v + to - 1) / to * to;
}

/* Device d's pieces at their handles' addresses: those of the attach,
 * the same again at a wake. */
static int map_pieces_memfd(wdc_client *c, wdc_attachment *a, const att_device *d)
{
    int prot = PROT_READ | (a->writable ? PROT_WRITE : 0);

    for (size_t h = 0; h < a->n_handles; h++)
        for (size_t i = a->handle_piece[h]; a->handles[h].device == d->device && i < a->handle_piece[h + 1]; i++) {
            att_piece *p = &a->pieces[i];
            if (mmap((char *)a->handles[h].ptr + p->at, p->bytes, prot, MAP_SHARED | MAP_FIXED, a->descs[p->desc].fd,
                     (off_t)p->offset) == MAP_FAILED)
                return wdc__fail(c, -errno, "mapping %llu bytes of device %d%s: %s", (unsigned long long)p->bytes,
                                 d->device, a->writable ? " writable" : "", strerror(errno));
            p->mapped = true;
        }
    return 0;
}

static int map_memfd(wdc_client *c, wdc_attachment *a, att_device *d)
{
    void *va;
    uint64_t at = 0;

    for (size_t h = 0; h < a->n_handles; h++)
        if (a->handles[h].device == d->device)
            d->va_bytes += round_up(a->handles[h].bytes, HOST_PAGE);
    if (!d->va_bytes)
        return 0;
    /* One range for the device, then each piece in its place. */
    va = mmap(NULL, d->va_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (va == MAP_FAILED)
        return wdc__fail(c, -errno, "reserving %llu bytes of address space: %s", (unsigned long long)d->va_bytes,
                         strerror(errno));
    d->va = (uintptr_t)va;
    for (size_t h = 0; h < a->n_handles; h++)
        if (a->handles[h].device == d->device) {
            a->handles[h].ptr = (char *)va + at;
            at += round_up(a->handles[h].bytes, HOST_PAGE);
        }
    return map_pieces_memfd(c, a, d);
}

#ifdef WD_WITH_CUDA
/* As map_pieces_memfd, with d's context current: each piece, then access
 * to the whole range (or handle by handle where handles leave gaps). */
static int map_pieces_cuda(wdc_client *c, wdc_attachment *a, const att_device *d)
{
    const wd_cuda *cu;
    CUmemAccessDesc access = {.location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = d->cuda},
                              .flags = a->writable ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE : CU_MEM_ACCESS_FLAGS_PROT_READ};
    bool gaps = false;
    int rc;

    if (!(cu = cuda(c, &rc)))
        return rc;
    for (size_t h = 0; h < a->n_handles; h++) {
        if (a->handles[h].device != d->device)
            continue;
        gaps |= a->handles[h].bytes % d->granularity != 0;
        for (size_t i = a->handle_piece[h]; i < a->handle_piece[h + 1]; i++) {
            att_piece *p = &a->pieces[i];
            CU(c, cu->cuMemMap((CUdeviceptr)(uintptr_t)a->handles[h].ptr + p->at, p->bytes, 0, a->descs[p->desc].vmm, 0),
               "cuMemMap");
            p->mapped = true;
        }
    }
    if (!gaps) {
        CU(c, cu->cuMemSetAccess((CUdeviceptr)d->va, d->va_bytes, &access, 1), "cuMemSetAccess");
    } else {
        for (size_t h = 0; h < a->n_handles; h++)
            if (a->handles[h].device == d->device)
                CU(c, cu->cuMemSetAccess((CUdeviceptr)(uintptr_t)a->handles[h].ptr, a->handles[h].bytes, &access, 1),
                   "cuMemSetAccess");
    }
out:
    return rc;
}

static int map_cuda(wdc_client *c, wdc_attachment *a, att_device *d, size_t di)
{
    const wd_cuda *cu;
    CUdeviceptr va = 0;
    uint64_t at = 0;
    int rc;

    if (!(cu = cuda(c, &rc)) || (rc = push(c, d)))
        return rc;
    if (a->kind == KIND_IPC) {
        for (size_t i = 0; i < a->n_descs; i++)
            if (a->descs[i].dev == di)
                CU(c, cu->cuIpcOpenMemHandle(&a->descs[i].opened, a->descs[i].ipc, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                   "cuIpcOpenMemHandle");
        for (size_t h = 0; h < a->n_handles; h++)
            if (a->handles[h].device == d->device) {
                const att_piece *p = &a->pieces[a->handle_piece[h]];
                a->handles[h].ptr = (void *)(uintptr_t)(a->descs[p->desc].opened + p->offset);
            }
        goto out;
    }
    for (size_t h = 0; h < a->n_handles; h++)
        if (a->handles[h].device == d->device)
            d->va_bytes += round_up(a->handles[h].bytes, d->granularity);
    if (!d->va_bytes)
        goto out;
    /* One range for the device's handles, side by side: one reservation
     * and one access grant instead of one per handle. */
    CU(c, cu->cuMemAddressReserve(&va, d->va_bytes, d->granularity, 0, 0), "cuMemAddressReserve");
    d->va = (uintptr_t)va;
    for (size_t h = 0; h < a->n_handles; h++)
        if (a->handles[h].device == d->device) {
            a->handles[h].ptr = (void *)(uintptr_t)(va + at);
            at += round_up(a->handles[h].bytes, d->granularity);
        }
    rc = map_pieces_cuda(c, a, d);
out:
    pop();
    return rc;
}
#endif

#ifdef WD_WITH_CUDA
/* With d's context current: its mapped pieces unmapped (their physical
 * memory goes once nothing else holds it), the range kept. */
static void unmap_cuda_pieces(const wd_cuda *cu, wdc_attachment *a, const att_device *d)
{
    for (size_t h = 0; h < a->n_handles; h++)
        for (size_t i = a->handle_piece[h]; a->handles[h].device == d->device && i < a->handle_piece[h + 1]; i++)
            if (a->pieces[i].mapped) {
                cu->cuMemUnmap((CUdeviceptr)(uintptr_t)a->handles[h].ptr + a->pieces[i].at, a->pieces[i].bytes);
                a->pieces[i].mapped = false;
            }
}
#endif

static void unlink_attachment(wdc_attachment *a)
{
    if (!a->client)
        return;
    for (wdc_attachment **p = &a->client->attachments; *p; p = &(*p)->next)
        if (*p == a) {
            *p = a->next;
            break;
        }
    a->client = NULL;
}

/* Everything a has taken here, mapped or not, back. */
static void release(wdc_attachment *a)
{
#ifdef WD_WITH_CUDA
    const wd_cuda *cu = NULL;
    wd_error err;

    if (a->kind != KIND_MEMFD && wd_cuda_load(&cu, &err))
        cu = NULL;
#endif
    for (size_t di = 0; di < a->n_devs; di++) {
        att_device *d = &a->devs[di];
        if (a->kind == KIND_MEMFD) {
            if (d->va)
                munmap((void *)d->va, d->va_bytes);
            continue;
        }
#ifdef WD_WITH_CUDA
        if (!cu || !d->ctx || cu->cuCtxPushCurrent(d->ctx) != CUDA_SUCCESS)
            continue;
        unmap_cuda_pieces(cu, a, d);
        if (d->va)
            cu->cuMemAddressFree((CUdeviceptr)d->va, d->va_bytes);
        for (size_t i = 0; i < a->n_descs; i++) {
            if (a->descs[i].dev != di)
                continue;
            if (a->descs[i].vmm)
                cu->cuMemRelease(a->descs[i].vmm);
            if (a->descs[i].opened)
                cu->cuIpcCloseMemHandle(a->descs[i].opened);
        }
        pop();
        cu->cuDevicePrimaryCtxRelease(d->dev);
#endif
    }
    for (size_t i = 0; i < a->n_descs; i++)
        if (a->descs[i].fd >= 0)
            close(a->descs[i].fd);
    unlink_attachment(a);
    for (size_t i = 0; i < a->n_tensors; i++) {
        free((char *)a->tensors[i].name);
        free((char *)a->tensors[i].dtype);
    }
    free(a->devs);
    free(a->descs);
    free(a->pieces);
    free(a->handles);
    free(a->handle_ids);
    free(a->handle_piece);
    free(a->tensors);
    free(a->parts);
    free(a->dims);
    free(a->sorted);
    free(a->info);
    free(a);
}

/* After mapping: what only mapping needed goes (descriptors, imported
 * handles: the mappings hold the memory now). */
static void drop_descriptors(wdc_attachment *a)
{
#ifdef WD_WITH_CUDA
    const wd_cuda *cu;
    wd_error err;

    if (a->kind == KIND_VMM && wd_cuda_load(&cu, &err) == 0)
        for (size_t i = 0; i < a->n_descs; i++) {
            CUcontext ignored;
            /* Kept for release() to try again if this fails. */
            if (!a->descs[i].vmm || cu->cuCtxPushCurrent(a->devs[a->descs[i].dev].ctx) != CUDA_SUCCESS)
                continue;
            if (cu->cuMemRelease(a->descs[i].vmm) == CUDA_SUCCESS)
                a->descs[i].vmm = 0;
            cu->cuCtxPopCurrent(&ignored);
        }
#endif
    for (size_t i = 0; i < a->n_descs; i++)
        if (a->descs[i].fd >= 0) {
            close(a->descs[i].fd);
            a->descs[i].fd = -1;
        }
}

/* After the first mapping: descriptors dropped, and the table's pointers. */
static void settle(wdc_attachment *a)
{
    drop_descriptors(a);
    for (size_t i = 0; i < a->n_tensors; i++) {
        wdc_tensor *t = &a->tensors[i];
        t->shape = t->ndim ? a->dims + (uintptr_t)t->shape : NULL;
        t->parts = t->n_parts ? a->parts + (uintptr_t)t->parts : NULL;
    }
    for (size_t i = 0; i < a->n_parts; i++)
        a->parts[i].ptr = (char *)a->handles[a->parts[i].handle].ptr + a->parts[i].handle_offset;
}

/* ---- sleep and wake --------------------------------------------------------------
 *
 * A "sleep" event: every piece unmapped, each device's address range kept
 * (on host, the range goes back to PROT_NONE), and "slept" sent. Touching
 * a tensor now faults: SIGSEGV on host, an illegal address on cuda (which
 * ends the process's CUDA context). A "wake" event brings the model's new
 * descriptors, of the same sizes in the same order (the daemon allocates
 * the same plan again); once all are in, each piece is mapped again where
 * it was, so that every pointer, tensor and CUDA graph over them holds. */

static wdc_attachment *attachment_of(wdc_client *c, const cJSON *msg)
{
    const cJSON *lease = cJSON_GetObjectItemCaseSensitive(msg, "lease");

    for (wdc_attachment *a = c->attachments; a && cJSON_IsNumber(lease); a = a->next)
        if ((double)a->lease == lease->valuedouble)
            return a;
    return NULL;
}

static void unmap_all(wdc_attachment *a)
{
#ifdef WD_WITH_CUDA
    const wd_cuda *cu;
    wd_error err;
#endif

    for (size_t di = 0; di < a->n_devs; di++) {
        att_device *d = &a->devs[di];
        if (a->kind == KIND_MEMFD) {
            if (d->va)
                mmap((void *)d->va, d->va_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                     -1, 0);
            for (size_t i = 0; i < a->n_pieces; i++)
                a->pieces[i].mapped = false;
            continue;
        }
#ifdef WD_WITH_CUDA
        if (wd_cuda_load(&cu, &err) || cu->cuCtxPushCurrent(d->ctx) != CUDA_SUCCESS)
            continue;
        /* Work queued on the device may still read the mappings. */
        cu->cuCtxSynchronize();
        unmap_cuda_pieces(cu, a, d);
        pop();
#endif
    }
}

static void on_sleep(wdc_client *c, wdc_attachment *a)
{
    int64_t id;
    cJSON *args;

    if (a->state != 0 || a->kind == KIND_IPC)
        return; /* (the daemon does not ask cuda-ipc holders) */
    unmap_all(a);
    a->state = WDC_ASLEEP;
    a->woken_descs = 0;
    /* Its reply is not waited for: readers drop replies nobody waits for. */
    if ((args = cJSON_CreateObject()) && cJSON_AddNumberToObject(args, "lease", (double)a->lease))
        wdc__send_request(c, "slept", args, 1000, &id);
    else
        cJSON_Delete(args);
}

/* Mapped again, where everything was. */
static int remap(wdc_client *c, wdc_attachment *a)
{
    int rc = 0;

    for (size_t di = 0; di < a->n_devs && !rc; di++) {
#ifdef WD_WITH_CUDA
        if (a->kind == KIND_VMM) {
            if (!(rc = push(c, &a->devs[di]))) {
                rc = map_pieces_cuda(c, a, &a->devs[di]);
                pop();
            }
            continue;
        }
#endif
        rc = map_pieces_memfd(c, a, &a->devs[di]);
    }
    return rc;
}

static void on_wake(wdc_client *c, wdc_attachment *a, const cJSON *msg)
{
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(msg, "descriptors"), *o;
    size_t n = (size_t)cJSON_GetArraySize(list), got = 0, i = 0;
    uint64_t total = 0;
    int fds[WP_MAX_FDS], rc = 0;

    if (n <= WP_MAX_FDS)
        got = wp_reader_take_fds(&c->rd, fds, n);
    if (a->state != WDC_ASLEEP) {
        rc = -EPROTO; /* not ours to map (or already broken): dropped */
        goto out;
    }
    if (got != n || get_u64(c, msg, "descriptors_total", &total) || total != a->n_descs) {
        rc = wdc__fail(c, -EPROTO, "weightd's wake: descriptors do not match the attach's");
        goto out;
    }
    cJSON_ArrayForEach(o, list)
    {
        uint64_t index, dev, bytes;
        att_desc *d;
        if ((rc = get_u64(c, o, "descriptor", &index)) || (rc = get_u64(c, o, "device", &dev)) ||
            (rc = get_u64(c, o, "bytes", &bytes)))
            goto out;
        if (index != a->woken_descs || index >= a->n_descs || (d = &a->descs[index])->bytes != bytes ||
            a->devs[d->dev].device != (int)dev) {
            rc = wdc__fail(c, -EPROTO, "weightd's wake: descriptor %llu is not the one of the attach",
                           (unsigned long long)index);
            goto out;
        }
        rc = take_descriptor(c, a, d, index, fds[i]);
        fds[i++] = -1;
        if (rc)
            goto out;
        a->woken_descs++;
    }
    if (a->woken_descs == a->n_descs) {
        if ((rc = remap(c, a)))
            goto out;
        drop_descriptors(a);
        a->state = 0;
    }
out:
    for (; i < got; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (rc && a->state == WDC_ASLEEP) {
        unmap_all(a); /* the tensors are not to be used: nothing half-mapped */
        a->state = rc;
    }
}

void wdc__lease_event(wdc_client *c, const cJSON *msg)
{
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(msg, "event");
    wdc_attachment *a;

    if (!cJSON_IsString(ev) || !(a = attachment_of(c, msg)))
        return;
    if (strcmp(ev->valuestring, "sleep") == 0)
        on_sleep(c, a);
    else if (strcmp(ev->valuestring, "wake") == 0)
        on_wake(c, a, msg);
}

void wdc__forget_attachments(wdc_client *c)
{
    while (c->attachments)
        unlink_attachment(c->attachments);
}

int wdc_attachment_state(const wdc_attachment *a) { return a->state; }

static int by_name(const void *x, const void *y, void *ctx)
{
    const wdc_attachment *a = ctx;
    return strcmp(a->tensors[*(const size_t *)x].name, a->tensors[*(const size_t *)y].name);
}

/* ---- the calls ---------------------------------------------------------------------- */

/* After a failed attach (everything it mapped already unmapped): the rest
 * of its stream read and dropped (its descriptors closed), then its lease
 * ended, so that the connection goes on in step, with its other leases.
 * Only a connection out of step (nothing came in time, a line too long, a
 * stream that ends before its reply) is closed, which ends every lease on
 * it. The call's error stays. */
static void abandon(wdc_client *c, int64_t id, bool replied, uint64_t lease, int rc, int timeout_ms)
{
    char code[32], message[1024];
    bool broken = rc == -ETIMEDOUT || rc == -ECONNRESET || rc == -EMSGSIZE;
    cJSON *msg;
    char *raw;

    snprintf(code, sizeof code, "%s", c->code);
    snprintf(message, sizeof message, "%s", c->message);
    while (!replied && !broken) {
        const cJSON *res = NULL;
        if (wdc__next_for(c, id, timeout_ms, &msg, &raw)) {
            broken = true;
            break;
        }
        replied = !cJSON_GetObjectItemCaseSensitive(msg, "event");
        if (replied && (wdc__reply_result(c, msg, &res) || !res))
            lease = 0; /* an error reply: the daemon ended the lease itself */
        cJSON_Delete(msg);
        wp_reader_drop_fds(&c->rd);
    }
    if (broken) {
        close(c->fd);
        c->fd = -1;
    } else if (lease) {
        char args[64];
        snprintf(args, sizeof args, "{\"lease\":%llu}", (unsigned long long)lease);
        wdc_call(c, "detach", args, timeout_ms, NULL, NULL, NULL);
    }
    wp_reader_drop_fds(&c->rd);
    snprintf(c->code, sizeof c->code, "%s", code);
    snprintf(c->message, sizeof c->message, "%s", message);
}

int wdc_attach(wdc_client *c, const char *name, const char *device, unsigned flags, int timeout_ms,
               wdc_attachment **out)
{
    wdc_attachment *a = NULL;
    cJSON *args, *msg = NULL, *summary = NULL, *client;
    const cJSON *result;
    double t0 = now(), t_reply;
    int64_t waited0 = c->waited_us;
    bool replied = false;
    int64_t id = 0;
    char *raw;
    int rc;

    *out = NULL;
    wp_reader_drop_fds(&c->rd);
    if (!(a = calloc(1, sizeof *a)) || !(args = cJSON_CreateObject())) {
        free(a);
        return wdc__fail(c, -ENOMEM, "out of memory");
    }
    a->writable = flags & WDC_ATTACH_WRITABLE;
    cJSON_AddStringToObject(args, "name", name);
    if (device)
        cJSON_AddStringToObject(args, "device", device);
    if (a->writable)
        cJSON_AddBoolToObject(args, "writable", 1);
    if ((rc = wdc__send_request(c, "attach", args, timeout_ms, &id)))
        goto fail;
    for (;;) {
        const cJSON *l;
        double tr = now();
        if ((rc = wdc__next_for(c, id, timeout_ms, &msg, &raw)))
            goto fail;
        a->read_seconds += now() - tr;
        if (!cJSON_GetObjectItemCaseSensitive(msg, "event"))
            break;
        if (!a->lease && cJSON_GetObjectItemCaseSensitive(msg, "lease") &&
            (rc = get_u64(c, msg, "lease", &a->lease))) {
            cJSON_Delete(msg);
            msg = NULL;
            goto fail;
        }
        if ((l = cJSON_GetObjectItemCaseSensitive(msg, "devices"))) {
            double ts = now();
            rc = on_devices(c, a, msg, l);
            a->setup_seconds += now() - ts;
        }
        else if ((l = cJSON_GetObjectItemCaseSensitive(msg, "descriptors")))
            rc = on_descriptors(c, a, l);
        else if ((l = cJSON_GetObjectItemCaseSensitive(msg, "handles")) ||
                 (l = cJSON_GetObjectItemCaseSensitive(msg, "tensors"))) {
            double tt = now();
            rc = strcmp(l->string, "handles") == 0 ? on_handles(c, a, l) : on_tensors(c, a, l);
            a->table_seconds += now() - tt;
        }
        cJSON_Delete(msg);
        msg = NULL;
        if (rc)
            goto fail;
    }
    t_reply = now();
    replied = true;
    if ((rc = wdc__reply_result(c, msg, &result))) {
        a->lease = 0; /* the daemon ended it with its error */
        goto fail;
    }
    {
        uint64_t n_desc = 0, n_handles = 0, n_tensors = 0;
        if ((rc = get_u64(c, result, "descriptors", &n_desc)) || (rc = get_u64(c, result, "handles", &n_handles)) ||
            (rc = get_u64(c, result, "tensors", &n_tensors)) || (rc = get_u64(c, result, "lease", &a->lease)))
            goto fail;
        const cJSON *token = cJSON_GetObjectItemCaseSensitive(result, "token");
        if (cJSON_IsString(token) && strlen(token->valuestring) < sizeof a->token)
            snprintf(a->token, sizeof a->token, "%s", token->valuestring);
        if (!a->devs || n_desc != a->n_descs || n_handles != a->n_handles || n_tensors != a->n_tensors) {
            rc = wdc__fail(c, -EPROTO, "weightd's attach announced %llu descriptors, %llu handles and %llu tensors "
                           "but sent %zu, %zu and %zu", (unsigned long long)n_desc, (unsigned long long)n_handles,
                           (unsigned long long)n_tensors, a->n_descs, a->n_handles, a->n_tensors);
            goto fail;
        }
    }
    for (size_t di = 0; di < a->n_devs; di++) {
#ifdef WD_WITH_CUDA
        rc = a->kind == KIND_MEMFD ? map_memfd(c, a, &a->devs[di]) : map_cuda(c, a, &a->devs[di], di);
#else
        rc = map_memfd(c, a, &a->devs[di]);
#endif
        if (rc)
            goto fail;
    }
    settle(a);
    if (a->n_tensors && !(a->sorted = malloc(a->n_tensors * sizeof *a->sorted))) {
        rc = wdc__fail(c, -ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < a->n_tensors; i++)
        a->sorted[i] = i;
    if (a->n_tensors)
        qsort_r(a->sorted, a->n_tensors, sizeof *a->sorted, by_name, a);
    summary = cJSON_Duplicate(result, 1);
    client = cJSON_AddObjectToObject(summary, "client");
    cJSON_AddNumberToObject(client, "seconds", now() - t0);
    cJSON_AddNumberToObject(client, "receive_seconds", t_reply - t0);
    cJSON_AddNumberToObject(client, "wait_seconds", (double)(c->waited_us - waited0) * 1e-6);
    cJSON_AddNumberToObject(client, "read_seconds", a->read_seconds);
    cJSON_AddNumberToObject(client, "table_seconds", a->table_seconds);
    cJSON_AddNumberToObject(client, "setup_seconds", a->setup_seconds);
    cJSON_AddNumberToObject(client, "import_seconds", a->import_seconds);
    cJSON_AddNumberToObject(client, "map_seconds", now() - t_reply);
    a->info = cJSON_PrintUnformatted(summary);
    cJSON_Delete(summary);
    cJSON_Delete(msg);
    if (!a->info) {
        rc = wdc__fail(c, -ENOMEM, "out of memory");
        msg = NULL;
        goto fail;
    }
    a->client = c;
    a->next = c->attachments;
    c->attachments = a;
    *out = a;
    return 0;
fail:
    cJSON_Delete(msg);
    {
        uint64_t lease = a->lease;
        release(a); /* unmapped before the lease ends */
        if (id && c->fd >= 0)
            abandon(c, id, replied, lease, rc, timeout_ms);
    }
    return rc;
}

size_t wdc_attachment_tensor_count(const wdc_attachment *a) { return a->n_tensors; }
size_t wdc_attachment_handle_count(const wdc_attachment *a) { return a->n_handles; }
uint64_t wdc_attachment_lease(const wdc_attachment *a) { return a->lease; }
const char *wdc_attachment_info(const wdc_attachment *a) { return a->info; }

const wdc_tensor *wdc_attachment_tensor(const wdc_attachment *a, size_t i)
{
    return i < a->n_tensors ? &a->tensors[i] : NULL;
}

const wdc_handle *wdc_attachment_handle(const wdc_attachment *a, size_t i)
{
    return i < a->n_handles ? &a->handles[i] : NULL;
}

const wdc_tensor *wdc_attachment_find(const wdc_attachment *a, const char *name)
{
    size_t lo = 0, hi = a->n_tensors;

    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int cmp = strcmp(a->tensors[a->sorted[mid]].name, name);
        if (cmp == 0)
            return &a->tensors[a->sorted[mid]];
        if (cmp < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

int wdc_read(const wdc_attachment *a, const wdc_part *p, uint64_t offset, void *dst, size_t len)
{
    if (offset > p->bytes || len > p->bytes - offset)
        return -ERANGE;
    if (a->kind == KIND_MEMFD) {
        memcpy(dst, (const char *)p->ptr + offset, len);
        return 0;
    }
#ifdef WD_WITH_CUDA
    {
        const wd_cuda *cu;
        wd_error err;
        CUcontext ignored;
        const att_device *d = &a->devs[device_index(a, p->device)];
        CUresult r;
        if (wd_cuda_load(&cu, &err))
            return err.code;
        if (cu->cuCtxPushCurrent(d->ctx) != CUDA_SUCCESS)
            return -EIO;
        r = cu->cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)p->ptr + offset, len);
        cu->cuCtxPopCurrent(&ignored);
        return r == CUDA_SUCCESS ? 0 : -EIO;
    }
#else
    return -ENOTSUP;
#endif
}

int wdc_tensor_checksum(const wdc_attachment *a, const wdc_tensor *t, uint64_t *out)
{
    const size_t chunk = 8u << 20;
    wd_summer *sum = wd_summer_new();
    char *buf = malloc(chunk);
    uint64_t pos = 0;
    int rc = 0, complete = 0;

    if (!sum || !buf) {
        rc = -ENOMEM;
        goto out;
    }
    wd_summer_start(sum, t->bytes);
    /* One copy: from offset 0, each part that starts where the last ended. */
    while (pos < t->bytes && !rc) {
        const wdc_part *p = NULL;
        for (size_t i = 0; i < t->n_parts && !p; i++)
            if (t->parts[i].tensor_offset == pos && t->parts[i].bytes)
                p = &t->parts[i];
        if (!p)
            break;
        for (uint64_t off = 0; off < p->bytes && !rc; off += chunk) {
            size_t n = p->bytes - off < chunk ? (size_t)(p->bytes - off) : chunk;
            if (!(rc = wdc_read(a, p, off, buf, n)))
                wd_summer_feed(sum, buf, n);
        }
        pos += p->bytes;
    }
    if (!rc) {
        *out = wd_summer_end(sum, &complete);
        if (!complete)
            rc = -ENODATA;
    }
out:
    wd_summer_free(sum);
    free(buf);
    return rc;
}

int wdc_reattach(wdc_client *c, wdc_attachment *a, int timeout_ms)
{
    double deadline = now() + (timeout_ms < 0 ? 1e9 : timeout_ms / 1e3);
    char args[96], path[sizeof c->path], *result = NULL;
    cJSON *res;
    uint64_t lease;
    int rc;

    if (!a->token[0])
        return wdc__fail(c, -ENOTSUP, "the daemon gave this lease no token: it cannot be taken again");
    /* The old connection is gone with the old daemon. (wdc_connect sets
     * c->path: it gets a copy.) */
    wdc__disconnect(c);
    snprintf(path, sizeof path, "%s", c->path);
    for (;;) {
        int left = (int)((deadline - now()) * 1e3);
        if (left <= 0)
            return wdc__fail(c, -ETIMEDOUT, "weightd did not come back at %s within %d ms", c->path, timeout_ms);
        rc = wdc_connect(c, path, left);
        if (rc == 0)
            break;
        /* Not back yet: no socket, nobody listening, or one that closes on us. */
        if (rc != -ECONNREFUSED && rc != -ECONNRESET && rc != -EPIPE && rc != -EBUSY)
            return rc;
        usleep(20000);
    }
    /* The whole timeout again, not what connecting left of it: a reattach
     * given up after it was sent would leave the lease on a connection that
     * then closes, which ends it. */
    snprintf(args, sizeof args, "{\"token\":\"%s\"}", a->token);
    if ((rc = wdc_call(c, "reattach", args, timeout_ms, NULL, NULL, &result)))
        return rc;
    res = cJSON_Parse(result);
    free(result);
    rc = get_u64(c, res, "lease", &lease);
    cJSON_Delete(res);
    if (!rc)
        a->lease = lease;
    return rc;
}

int wdc_detach(wdc_client *c, wdc_attachment *a, int timeout_ms)
{
    char args[64];
    int rc;

    if (!a)
        return 0;
    /* Unmapped first: the lease lasts while anything is mapped. */
    snprintf(args, sizeof args, "{\"lease\":%llu}", (unsigned long long)a->lease);
    release(a);
    rc = wdc_call(c, "detach", args, timeout_ms, NULL, NULL, NULL);
    return rc;
}
