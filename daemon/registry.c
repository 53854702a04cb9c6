/* The models the daemon holds: each model owns its state, its slabs of
 * device memory and the leases of the workers attached to it; loads, unloads
 * and attaches go through here. */
#include "daemon/daemon.h"
#include "common/fault.h"
#include "daemon/lease.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"
#include "common/size.h"

/* Each part starts at a 512-byte boundary, as PyTorch's blocks do: any
 * dtype's kernels may assume that much of a tensor's address. */
#define PART_ALIGN 512u
/* Slabs are whole pages of the GPU's granularity, so that a slab is one
 * physical allocation, shared with nothing else. */
#define SLAB_ROUND (2ull << 20)
#define SLAB_SMALL (1ull << 20)
#define SLAB_MIN (256ull << 20)
#define SLABS_PER_DEVICE 32

static uint64_t round_up(uint64_t v, uint64_t to)
{
    return (v + to - 1) / to * to;
}

const char *wd_model_state_name(wd_model_state st)
{
    static const char *const names[] = {
#define X(id, name) name,
        WD_MODEL_STATES(X)
#undef X
    };
    return (unsigned)st < sizeof names / sizeof names[0] ? names[st] : "unknown";
}

int wd_model_name_check(const char *name, wd_error *err)
{
    size_t n = strlen(name);

    if (n == 0 || n > WD_MODEL_NAME_MAX)
        return wd_error_set(err, -EINVAL, "a model name has 1 to %d characters", WD_MODEL_NAME_MAX);
    if (name[0] == '.' || name[0] == '-')
        return wd_error_set(err, -EINVAL, "model name \"%s\" may not start with '.' or '-'", name);
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
              ch == '_' || ch == '-'))
            return wd_error_set(err, -EINVAL, "model name \"%s\": only letters, digits, '.', '_' and '-' are allowed",
                                name);
    }
    return 0;
}

wd_model *wd_registry_find(wd_server *s, const char *name)
{
    for (wd_model *m = s->models; m; m = m->next)
        if (strcmp(m->name, name) == 0)
            return m;
    return NULL;
}

size_t wd_registry_count(const wd_server *s)
{
    size_t n = 0;

    for (const wd_model *m = s->models; m; m = m->next)
        n++;
    return n;
}

int wd_registry_add(wd_server *s, const char *name, const char *path, const int *devices, size_t n_devices,
                    wl_placement placement, wd_model **out, wd_error *err)
{
    wd_model *m, **tail;
    int rc;

    if ((rc = wd_model_name_check(name, err)))
        return rc;
    if (wd_registry_find(s, name))
        return wd_error_set(err, -EEXIST, "a model named \"%s\" is already loaded (unload it or choose another --name)",
                            name);
    if (!(m = wd_calloc(1, sizeof *m)) || !(m->name = wd_strdup(name)) || !(m->path = wd_strdup(path)) ||
        !(m->devices = wd_malloc(n_devices * sizeof *m->devices))) {
        if (m) {
            free(m->name);
            free(m->path);
        }
        free(m);
        return wd_error_set(err, -ENOMEM, "out of memory");
    }
    memcpy(m->devices, devices, n_devices * sizeof *devices);
    m->n_devices = n_devices;
    m->placement = placement;
    m->state = WD_MODEL_LOADING;
    /* Keep arrival order so that list shows models as they came. */
    for (tail = &s->models; *tail; tail = &(*tail)->next)
        ;
    *tail = m;
    *out = m;
    return 0;
}

/* Every slab of m freed (its dests without memory again); with give_back,
 * the cached segments of its devices go back to them too. */
static void free_slabs(wd_server *s, wd_model *m, bool give_back)
{
    for (size_t k = 0; k < m->n_slabs; k++)
        if (m->slabs[k].block) {
            wa_free(s->alloc, m->slabs[k].block);
            m->slabs[k].block = NULL;
        }
    for (size_t i = 0; m->dest && i < m->n_dest; i++)  /* a failed place leaves n_dest, no dest */
        m->dest[i].mem = NULL;
    m->slabs_allocated = m->dests_ready = 0;
    for (size_t i = 0; give_back && i < m->n_devices; i++)
        wa_empty_cache(s->alloc, m->devices[i]);
}

void wd_model_free_memory(wd_server *s, wd_model *m)
{
    free_slabs(s, m, true);
}

void wd_registry_remove(wd_server *s, wd_model *m, bool give_back)
{
    for (wd_model **link = &s->models; *link; link = &(*link)->next)
        if (*link == m) {
            *link = m->next;
            break;
        }
    free_slabs(s, m, give_back);
    wd_attach_forget(m);
    wd_sleep_free(s, m);
    wl_checkpoint_close(&m->ckpt);
    free(m->slabs);
    free(m->part);
    free(m->dest);
    free(m->sums);
    for (size_t i = 0; i < m->n_stored; i++)
        free(m->stored[i]);
    free(m->stored);
    free(m->record);
    free(m->devices);
    free(m->name);
    free(m->path);
    free(m);
}

const char *wd_model_devices_text(const wd_model *m, char *buf, size_t len)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < m->n_devices && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%d", i ? "," : "", m->devices[i]);
    return buf;
}

cJSON *wd_model_devices_json(const wd_model *m)
{
    cJSON *a = cJSON_CreateArray();

    for (size_t i = 0; i < m->n_devices; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(m->devices[i]));
    return a;
}

/* ---- slabs ------------------------------------------------------------------ */

/* Which of m's devices (an index into m->devices) device is. */
static size_t device_index(const wd_model *m, int device)
{
    size_t i = 0;

    while (i < m->n_devices - 1 && m->devices[i] != device)
        i++;
    return i;
}

int wd_model_plan_slabs(wd_model *m, uint64_t slab_size, wd_error *err)
{
    uint64_t *target = wd_calloc(m->n_devices, sizeof *target);
    size_t *open = wd_malloc(m->n_devices * sizeof *open), cap = 0;
    int rc = 0;

    /* A plan replaces any earlier one (of a model with nothing allocated). */
    free(m->slabs);
    free(m->part);
    m->slabs = NULL;
    m->part = NULL;
    m->n_slabs = m->slabs_allocated = m->dests_ready = 0;
    if (!target || !open || !(m->part = wd_calloc(m->n_dest ? m->n_dest : 1, sizeof *m->part))) {
        rc = wd_error_set(err, -ENOMEM, "out of host memory");
        goto out;
    }
    for (size_t i = 0; i < m->n_dest; i++)
        target[device_index(m, m->dest[i].device)] += round_up(m->dest[i].len, PART_ALIGN);
    for (size_t d = 0; d < m->n_devices; d++) {
        uint64_t share = round_up(target[d] / SLABS_PER_DEVICE, SLAB_ROUND);
        target[d] = slab_size ? slab_size : share > SLAB_MIN ? share : SLAB_MIN;
        open[d] = SIZE_MAX;
    }
    for (size_t i = 0; i < m->n_dest; i++) {
        const wl_dest *dd = &m->dest[i];
        size_t d = device_index(m, dd->device), k = open[d];
        uint64_t at = k == SIZE_MAX ? 0 : round_up(m->slabs[k].bytes, PART_ALIGN);

        if (dd->len == 0) {
            m->part[i] = (wd_part){.slab = WD_NO_SLAB};
            continue;
        }
        /* A part never straddles slabs; one larger than the target has a
         * slab of its own. */
        if (k == SIZE_MAX || at + dd->len > target[d]) {
            if (WD_GROW(m->slabs, cap, m->n_slabs + 1, 16)) {
                rc = wd_error_set(err, -ENOMEM, "out of host memory");
                goto out;
            }
            k = open[d] = m->n_slabs++;
            m->slabs[k] = (wd_slab){.device = dd->device, .first_dest = i};
            at = 0;
        }
        m->part[i] = (wd_part){.slab = (uint32_t)k, .offset = at};
        m->slabs[k].bytes = at + dd->len;
        m->slabs[k].end_dest = i + 1;
    }
    /* Slabs past the small pool's 1 MiB are whole pages; the small ones
     * (--slab-size of a tensor each) share the small pool's pages. */
    for (size_t k = 0; k < m->n_slabs; k++)
        if (m->slabs[k].bytes > SLAB_SMALL)
            m->slabs[k].bytes = round_up(m->slabs[k].bytes, SLAB_ROUND);
out:
    free(target);
    free(open);
    return rc;
}

int wd_model_place(wd_model *m, uint64_t slab_size, bool checksums, wd_error *err)
{
    wl_target *targets = NULL;
    int rc;

    if ((rc = wl_place(&m->ckpt, m->devices, m->n_devices, m->placement, &targets, &m->n_dest, err)))
        return rc;
    if (!(m->dest = wd_calloc(m->n_dest ? m->n_dest : 1, sizeof *m->dest)) ||
        (checksums &&
         (!(m->sums = wd_calloc(m->ckpt.n_tensors ? m->ckpt.n_tensors : 1, sizeof *m->sums))))) {
        rc = wd_error_set(err, -ENOMEM, "out of host memory");
        goto out;
    }
    for (size_t i = 0; i < m->n_dest; i++) {
        const wl_target *t = &targets[i];
        m->dest[i] = (wl_dest){.tensor = t->tensor, .tensor_off = t->offset, .len = t->len, .device = t->device};
        m->device_bytes += t->len;
    }
    m->slab_size = slab_size;
    rc = wd_model_plan_slabs(m, slab_size, err);
out:
    free(targets);
    return rc;
}

void wd_model_slab_placed(wd_model *m, wa_block *block)
{
    wd_slab *sl = &m->slabs[m->slabs_allocated];
    uint32_t k = (uint32_t)m->slabs_allocated;
    wa_region reg;

    sl->block = block;
    wa_block_region(block, &reg);
    for (size_t i = sl->first_dest; i < sl->end_dest; i++)
        if (m->part[i].slab == k) {
            m->dest[i].mem = reg.mem;
            m->dest[i].offset = reg.offset + m->part[i].offset;
        }
    m->slabs_allocated++;
    /* Slabs go in the order of their first dest: the dests ready are those
     * up to the first whose slab is not allocated yet. */
    while (m->dests_ready < m->n_dest &&
           (m->part[m->dests_ready].slab == WD_NO_SLAB || m->part[m->dests_ready].slab < m->slabs_allocated))
        m->dests_ready++;
}

int wd_model_allocate_slab(wd_server *s, wd_model *m, wd_error *err)
{
    wd_slab *sl = &m->slabs[m->slabs_allocated];
    wa_block *block;
    int rc;

    if ((rc = wd_fault_site() ? wd_error_set(err, -ENOMEM, "out of memory (an injected fault)")
                              : wa_malloc(s->alloc, sl->device, sl->bytes, &block, err))) {
        char size[32];
        wd_error_prefix(err, "slab %zu of %zu (%s, from tensor \"%s\") on device %d", m->slabs_allocated + 1,
                        m->n_slabs, wd_size_format(sl->bytes, size, sizeof size),
                        m->ckpt.tensors[m->dest[sl->first_dest].tensor].st->name, sl->device);
        return rc;
    }
    wd_model_slab_placed(m, block);
    return 0;
}

/* ---- unload ------------------------------------------------------------------ */

static void finish_unload(wd_server *s, wd_model *m, wd_request *r, bool keep_cached)
{
    cJSON *res = cJSON_CreateObject();
    char size[32];

    cJSON_AddStringToObject(res, "name", m->name);
    cJSON_AddNumberToObject(res, "bytes", (double)m->ckpt.total_bytes);
    cJSON_AddNumberToObject(res, "device_bytes", (double)m->device_bytes);
    wd_log(WD_LOG_notice, "unloaded %s (%s)", m->name, wd_size_format(m->device_bytes, size, sizeof size));
    /* A daemon that unloads a model gives its memory back to the devices
     * (unless asked to keep the segments cached for the next load), and
     * systemd's fd store lets go of it. */
    cJSON_AddBoolToObject(res, "kept_cached", keep_cached);
    wd_registry_remove(s, m, !keep_cached);
    wd_fdstore_sync(s);
    wd_reply_ok(r, res);
}

int wd_model_unload(wd_server *s, wd_model *m, wd_request *r, bool force, double wait, bool keep_cached)
{
    char holders[512];

    if (m->state == WD_MODEL_UNLOADING)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is already being unloaded", m->name);
    if (m->state == WD_MODEL_SLEEPING || m->state == WD_MODEL_WAKING)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is %s; unload it once that is over", m->name,
                            wd_model_state_name(m->state));
    if (force)
        wd_leases_end_orphans(s, m, "a forced unload (its worker is not back since the restart)");
    if (m->leases && !force) {
        wd_leases_describe(m, holders, sizeof holders);
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is attached by %s; detach them first, or unload --force",
                            m->name, holders);
    }
    /* Verifies give way to an unload: queued ones end now, running ones
     * at their next chunk (while the model is still READY, so that none of
     * these ends finishes the unload under this loop). */
    if (m->busy)
        wd_jobs_cancel_verifies(s, m, "the model is being unloaded");
    if (!m->leases && !m->busy) {
        finish_unload(s, m, r, keep_cached);
        return 0;
    }
    if (m->leases) {
        wd_leases_describe(m, holders, sizeof holders);
        wd_log(WD_LOG_notice, "unloading %s: asking %s to detach (%.0f s at most)", m->name, holders, wait);
    }
    m->unload_from = m->state;
    m->state = WD_MODEL_UNLOADING;
    m->unload = r;
    m->unload_keep_cached = keep_cached;
    m->unload_deadline = wd_now() + wait;
    wd_leases_revoke(s, m, "unload");
    return 0;
}

void wd_model_released(wd_server *s, wd_model *m)
{
    wd_request *r = m->unload;

    wd_sleep_released(s, m);
    if (m->state != WD_MODEL_UNLOADING || m->leases || m->busy || !r)
        return;
    m->unload = NULL;
    finish_unload(s, m, r, m->unload_keep_cached);
}

void wd_models_request_gone(wd_server *s, wd_request *r)
{
    for (wd_model *m = s->models; m; m = m->next)
        if (m->unload == r) {
            wd_log(WD_LOG_info, "the forced unload of %s stopped waiting: its client went away", m->name);
            m->unload = NULL;
            m->state = m->unload_from; /* ready or asleep, as before */
        }
}

void wd_models_tick(wd_server *s)
{
    double now = wd_now();

    for (wd_model *m = s->models; m; m = m->next) {
        char holders[512];
        wd_request *r = m->unload;
        if (m->state != WD_MODEL_UNLOADING || now < m->unload_deadline)
            continue;
        m->unload = NULL;
        m->state = m->unload_from; /* ready or asleep, as before */
        wd_leases_describe(m, holders, sizeof holders);
        wd_log(WD_LOG_warning, "unload of %s gave up: still attached by %s", m->name, holders);
        wd_reply_error(r, -EBUSY, "model \"%s\" is still attached by %s after they were asked to detach", m->name,
                       holders);
    }
}
