/* libweightd-torch.so: a PyTorch pluggable allocator over weightd's
 * allocator (allocator/allocator.h). This file only translates: PyTorch's
 * pointers to blocks, tag names to numbers, statistics to PyTorch's names;
 * the rules are the allocator's. */
#include "pytorch/weightd-torch.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "allocator/allocator.h"
#include "common/size.h"

#define MAX_TAGS 256

/* Handed-out blocks by address: open addressing, linear probing. */
typedef struct slot {
    uint64_t addr;   /* 0: empty */
    wa_block *block; /* NULL with addr set: a deleted entry */
} slot;

static struct {
    pthread_mutex_t lock;
    bool ready;
    int ready_rc;
    char ready_err[sizeof(((wd_error *)0)->msg)];
    char *conf;                 /* weightd_torch_configure's, before set-up */
    wa_backend *backend;
    wa_allocator *alloc;
    uint32_t tag;               /* requests go under it; 0: none */
    char *tags[MAX_TAGS];       /* tag i + 1's name */
    size_t n_tags;
    slot *slots;
    size_t cap, used, live;     /* used: live and deleted entries */
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

static __thread char last_error[sizeof(((wd_error *)0)->msg)];

const char *weightd_torch_error(void)
{
    return last_error;
}

static int fail(int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return rc;
}

static int fail_err(int rc, const wd_error *err)
{
    return fail(rc, "%s", err->msg[0] ? err->msg : strerror(-rc));
}

/* ---- the address table ----------------------------------------------------- */

static size_t slot_of(uint64_t addr, size_t cap)
{
    addr ^= addr >> 33;
    addr *= 0xff51afd7ed558ccdULL;
    addr ^= addr >> 33;
    return (size_t)addr & (cap - 1);
}

/* Twice the room, or the same room without the deleted entries. */
static int table_grow(void)
{
    size_t cap = !g.cap ? 1024 : g.live * 4 < g.cap ? g.cap : g.cap * 2;
    slot *old = g.slots, *fresh = calloc(cap, sizeof *fresh);
    size_t old_cap = g.cap;

    if (!fresh)
        return -ENOMEM;
    g.slots = fresh;
    g.cap = cap;
    g.used = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].block) {
            size_t k = slot_of(old[i].addr, cap);
            while (g.slots[k].addr)
                k = (k + 1) & (cap - 1);
            g.slots[k] = old[i];
            g.used++;
        }
    free(old);
    return 0;
}

static int table_put(uint64_t addr, wa_block *b)
{
    size_t k;

    if ((g.used + 1) * 10 > g.cap * 7 && table_grow())
        return -ENOMEM;
    for (k = slot_of(addr, g.cap); g.slots[k].addr; k = (k + 1) & (g.cap - 1))
        ;
    g.slots[k] = (slot){addr, b};
    g.used++;
    g.live++;
    return 0;
}

static wa_block *table_take(uint64_t addr)
{
    if (!g.cap || !addr)
        return NULL;
    for (size_t k = slot_of(addr, g.cap); g.slots[k].addr; k = (k + 1) & (g.cap - 1))
        if (g.slots[k].addr == addr && g.slots[k].block) {
            wa_block *b = g.slots[k].block;
            g.slots[k].block = NULL; /* deleted: probing goes on past it */
            g.live--;
            return b;
        }
    return NULL;
}

/* ---- set-up ------------------------------------------------------------------ */

static int set_up_locked(void)
{
    wa_backend_opts opts = {.name = getenv("WEIGHTD_TORCH_BACKEND"), .n_devices = 1, .private_memory = true};
    const char *conf = g.conf ? g.conf : getenv("WEIGHTD_ALLOC_CONF");
    const char *cap = getenv("WEIGHTD_TORCH_CAPACITY"), *devs = getenv("WEIGHTD_TORCH_DEVICES");
    wd_error err = {0};
    int rc = 0;

    if (g.ready)
        return g.ready_rc ? fail(g.ready_rc, "%s", g.ready_err) : 0;
    g.ready = true;
    if (!opts.name || !*opts.name)
        opts.name = "cuda";
    if (cap && *cap && wd_size_parse(cap, &opts.capacity))
        rc = wd_error_set(&err, -EINVAL, "WEIGHTD_TORCH_CAPACITY=\"%s\" is not a size", cap);
    else if (devs && *devs && (opts.n_devices = atoi(devs)) < 1)
        rc = wd_error_set(&err, -EINVAL, "WEIGHTD_TORCH_DEVICES=\"%s\" is not a count", devs);
    else if (!opts.capacity && strcmp(opts.name, "cuda") != 0)
        opts.capacity = 1ULL << 30; /* the emulated devices need one */
    if (!rc && !(rc = wa_backend_create(&opts, &g.backend, &err)) &&
        (rc = wa_create(g.backend, conf, &g.alloc, &err))) {
        wa_backend_destroy(g.backend);
        g.backend = NULL;
    }
    if (rc) {
        g.ready_rc = rc;
        snprintf(g.ready_err, sizeof g.ready_err, "%s", err.msg);
        return fail(rc, "%s", g.ready_err);
    }
    return 0;
}

/* Every entry point but alloc and free: the lock held and the allocator up. */
static int enter(void)
{
    int rc;

    pthread_mutex_lock(&g.lock);
    if ((rc = set_up_locked()))
        pthread_mutex_unlock(&g.lock);
    return rc;
}

static int leave(int rc)
{
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int weightd_torch_configure(const char *conf)
{
    char *copy;

    pthread_mutex_lock(&g.lock);
    if (g.ready)
        return leave(fail(-EBUSY, "the allocator is set up already (configure before the first CUDA allocation)"));
    if (!(copy = strdup(conf ? conf : "")))
        return leave(fail(-ENOMEM, "out of memory"));
    free(g.conf);
    g.conf = copy;
    return leave(0);
}

/* ---- the pluggable pair ------------------------------------------------------ */

/* A request that cannot be met. PyTorch takes whatever the pluggable
 * allocator returns as memory, NULL too (a tensor at address 0 that faults
 * at its first use, far from here), and a C function cannot raise its
 * OutOfMemoryError: so the process ends here, saying why, unless
 * WEIGHTD_TORCH_OOM=null asks for the NULL (for callers that check). */
static void *refused(ssize_t size, int device, const char *why)
{
    const char *oom = getenv("WEIGHTD_TORCH_OOM");

    fprintf(stderr, "weightd's allocator: %zd bytes on device %d: %s\n", size, device, why);
    if (oom && strcmp(oom, "null") == 0)
        return NULL;
    fprintf(stderr, "weightd's allocator: stopping the process (PyTorch would take a NULL for memory; "
                    "WEIGHTD_TORCH_OOM=null returns it instead)%s\n",
            oom && *oom && strcmp(oom, "abort") != 0 ? "; WEIGHTD_TORCH_OOM is neither abort nor null" : "");
    abort();
}

void *weightd_torch_alloc(ssize_t size, int device, void *stream)
{
    wa_block *b = NULL;
    wa_region r;
    wd_error err = {0};
    int rc;

    if (size <= 0)
        return NULL; /* PyTorch's empty tensors have no memory */
    if ((rc = enter()))
        return refused(size, device, last_error);
    rc = wa_malloc_in(g.alloc, device, (uint64_t)(uintptr_t)stream, g.tag, (uint64_t)size, &b, &err);
    if (!rc) {
        wa_block_region(b, &r);
        if (table_put(r.addr, b)) {
            wa_free(g.alloc, b);
            rc = wd_error_set(&err, -ENOMEM, "out of host memory for the address table");
        }
    }
    leave(0);
    if (rc) {
        fail_err(rc, &err);
        return refused(size, device, last_error);
    }
    return (void *)(uintptr_t)r.addr;
}

void weightd_torch_free(void *ptr, ssize_t size, int device, void *stream)
{
    wa_block *b;

    (void)size;
    (void)device;
    (void)stream; /* the block's own stream is the one it was handed out on */
    if (!ptr || enter())
        return;
    if ((b = table_take((uint64_t)(uintptr_t)ptr)))
        wa_free(g.alloc, b);
    else
        fprintf(stderr, "weightd's allocator: free of %p, which it did not hand out\n", ptr);
    leave(0);
}

/* ---- policies and tags ----------------------------------------------------- */

int weightd_torch_policy_push(const char *conf)
{
    wd_error err = {0};
    int rc;

    if ((rc = enter()))
        return rc;
    if ((rc = wa_policy_push(g.alloc, conf ? conf : "", &err)))
        fail_err(rc, &err);
    return leave(rc);
}

int weightd_torch_policy_pop(void)
{
    int rc;

    if ((rc = enter()))
        return rc;
    if ((rc = wa_policy_pop(g.alloc)))
        fail(rc, "no policy was pushed");
    return leave(rc);
}

int weightd_torch_policy(char *buf, size_t len)
{
    int rc;

    if ((rc = enter()))
        return rc;
    wa_config_format(wa_get_config(g.alloc), buf, len);
    return leave(0);
}

const char *weightd_torch_load_policy(void)
{
    return WA_WEIGHTD_POLICY;
}

/* tag's number (made on first use when make), or 0 for none. */
static int tag_number(const char *tag, bool make, uint32_t *out)
{
    *out = 0;
    if (!tag || !*tag)
        return 0;
    for (size_t i = 0; i < g.n_tags; i++)
        if (strcmp(g.tags[i], tag) == 0) {
            *out = (uint32_t)i + 1;
            return 0;
        }
    if (!make)
        return fail(-ENOENT, "no memory was ever allocated under tag \"%s\"", tag);
    if (g.n_tags == MAX_TAGS)
        return fail(-ENOSPC, "at most %d tags", MAX_TAGS);
    if (!(g.tags[g.n_tags] = strdup(tag)))
        return fail(-ENOMEM, "out of memory");
    *out = (uint32_t)++g.n_tags;
    return 0;
}

int weightd_torch_set_tag(const char *tag)
{
    uint32_t n;
    int rc;

    if ((rc = enter()))
        return rc;
    if (!(rc = tag_number(tag, true, &n)))
        g.tag = n;
    return leave(rc);
}

/* Sleep (offload >= 0) or wake (offload < 0) of a tag that has memory. */
static int sleep_or_wake(const char *tag, int offload)
{
    wd_error err = {0};
    uint32_t n;
    int rc;

    if ((rc = enter()))
        return rc;
    if (!(rc = tag_number(tag, false, &n)) && !n)
        rc = fail(-EINVAL, "%s needs a tag: untagged memory does not sleep", offload < 0 ? "wake" : "sleep");
    if (!rc && (rc = offload < 0 ? wa_tag_wake(g.alloc, n, &err) : wa_tag_sleep(g.alloc, n, offload != 0, &err)))
        fail_err(rc, &err);
    return leave(rc);
}

int weightd_torch_sleep(const char *tag, int offload)
{
    return sleep_or_wake(tag, offload ? 1 : 0);
}

int weightd_torch_wake(const char *tag)
{
    return sleep_or_wake(tag, -1);
}

int weightd_torch_empty_cache(void)
{
    int rc;

    if ((rc = enter()))
        return rc;
    wa_empty_cache(g.alloc, -1);
    return leave(0);
}

int weightd_torch_reset_peaks(void)
{
    int rc;

    if ((rc = enter()))
        return rc;
    wa_reset_peaks(g.alloc, -1);
    return leave(0);
}

/* ---- statistics and snapshots ------------------------------------------------ */

static int print_json(cJSON *o, char **json)
{
    *json = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return *json ? 0 : fail(-ENOMEM, "out of memory");
}

/* PyTorch's names: "allocated_bytes.all.current"; the oversize counts have
 * no pool ("oversize_allocations.current"). */
int weightd_torch_stats(int device, char **json)
{
    wa_stats st;
    cJSON *o;
    char key[64];
    int rc;

    if ((rc = enter()))
        return rc;
    rc = wa_get_stats(g.alloc, device, &st);
    leave(0);
    if (rc)
        return fail(-ENODEV, "no device %d", device);
    if (!(o = cJSON_CreateObject()))
        return print_json(NULL, json);
#define X(name, what)                                                                                   \
    snprintf(key, sizeof key, strncmp(#name, "oversize", 8) ? "%s.all.%s" : "%s.%s", #name, "current"); \
    cJSON_AddNumberToObject(o, key, (double)st.name.current);                                           \
    snprintf(key, sizeof key, strncmp(#name, "oversize", 8) ? "%s.all.%s" : "%s.%s", #name, "peak");    \
    cJSON_AddNumberToObject(o, key, (double)st.name.peak);
    WA_STAT_LIST(X)
#undef X
#define X(name, what) cJSON_AddNumberToObject(o, #name, (double)st.name);
    WA_COUNTER_LIST(X)
#undef X
    cJSON_AddNumberToObject(o, "capacity", (double)st.capacity);
    cJSON_AddNumberToObject(o, "largest_free_block", (double)st.largest_free_block);
    cJSON_AddNumberToObject(o, "fragmentation", st.fragmentation);
    return print_json(o, json);
}

int weightd_torch_snapshot(int device, char **json)
{
    wa_snap_segment *segs = NULL;
    size_t n = 0;
    cJSON *list;
    int rc;

    if ((rc = enter()))
        return rc;
    rc = wa_snapshot(g.alloc, device, &segs, &n);
    leave(0);
    if (rc)
        return fail(rc, rc == -ENODEV ? "no device %d" : "out of memory", device);
    if ((list = cJSON_CreateArray()))
        for (size_t i = 0; i < n; i++) {
            cJSON *s = cJSON_CreateObject(), *blocks = cJSON_CreateArray();
            cJSON_AddNumberToObject(s, "address", (double)segs[i].addr);
            cJSON_AddNumberToObject(s, "total_size", (double)segs[i].size);
            cJSON_AddNumberToObject(s, "mapped_size", (double)segs[i].mapped);
            cJSON_AddStringToObject(s, "segment_type", segs[i].small_pool ? "small" : "large");
            cJSON_AddBoolToObject(s, "expandable", segs[i].expandable);
            for (size_t k = 0; k < segs[i].n_blocks; k++) {
                const wa_snap_block *b = &segs[i].blocks[k];
                cJSON *o = cJSON_CreateObject();
                cJSON_AddNumberToObject(o, "address", (double)b->addr);
                cJSON_AddNumberToObject(o, "size", (double)b->size);
                cJSON_AddNumberToObject(o, "requested_size", (double)b->requested);
                cJSON_AddStringToObject(o, "state", b->allocated ? "active_allocated"
                                                    : b->mapped  ? "inactive"
                                                                 : "unmapped");
                cJSON_AddItemToArray(blocks, o);
            }
            cJSON_AddItemToObject(s, "blocks", blocks);
            cJSON_AddItemToArray(list, s);
        }
    wa_snapshot_free(segs, n);
    return print_json(list, json);
}

void weightd_torch_string_free(char *s)
{
    cJSON_free(s);
}
