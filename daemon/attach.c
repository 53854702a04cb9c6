/* attach, detach and leases: serving a model's memory to worker processes.
 *
 * An attach is answered by a stream of "attach" events, then the reply:
 *   descriptors  what the worker imports: on cuda and host one descriptor
 *                each, passed as SCM_RIGHTS on the message that lists it (at
 *                most WP_MAX_FDS a message); on cuda-ipc the IPC handle's bytes
 *   handles      what it maps: one per slab, a contiguous range made of
 *                pieces of descriptors placed one after another
 *   tensors      name, dtype, shape and, per part on a device, the handle and
 *                the offset in it where the part's bytes are
 * Each list comes in pages that fit a message; the reply says how many of
 * each came, so that the worker knows it has them all. Everything is sent
 * from the loop at once: a model's handles are a few dozen (slabs), its
 * tensors a few thousand, and the messages are queued on the connection,
 * which stops reading that client's requests until it has caught up. */
#include "daemon/daemon.h"
#include "daemon/lease.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/grow.h"
#include "common/fault.h"

#define PAGE_BUDGET (768u * 1024u) /* bytes of entries per message, under WP_MAX_LINE */
#define LEASES_PAGE 2000

/* One thing a worker imports: one physical allocation (its descriptor, or
 * its IPC handle), listed once however many pieces lie on it. */
typedef struct share_desc {
    const wa_mem *mem;
    int device;
} share_desc;

typedef struct share_piece {
    uint32_t desc;
    uint64_t bytes, at;      /* the whole descriptor, at `at` in its handle */
} share_piece;

typedef struct share_handle {
    int device;
    uint64_t bytes;
    size_t first_piece, n_pieces;
    uint64_t slab_at;        /* where the slab starts in the handle */
} share_handle;

typedef struct share_table {
    share_desc *desc;
    size_t n_desc, cap_desc;
    size_t *index;           /* open addressing over desc, by mem */
    size_t index_cap;
    share_piece *pieces;
    size_t n_pieces, cap_pieces;
    share_handle *handles;   /* one per slab of the model (unused ones bytes 0) */
    uint64_t bytes;          /* the handles' bytes */
    size_t n_handles;        /* those on the devices attached */
} share_table;

static void table_free(share_table *t)
{
    free(t->desc);
    free(t->index);
    free(t->pieces);
    free(t->handles);
}

static size_t hash_mem(const wa_mem *mem, size_t cap)
{
    return (size_t)(((uintptr_t)mem * 0x9E3779B97F4A7C15ull) >> 17) & (cap - 1);
}

/* The descriptor of mem (the allocator's record of one allocation: the
 * same for every block on it), added when new; SIZE_MAX when out of memory. */
static size_t desc_for(share_table *t, const wa_mem *mem, int device)
{
    size_t at;

    if (2 * (t->n_desc + 1) > t->index_cap) {
        size_t cap = t->index_cap ? 2 * t->index_cap : 64, *index = wd_malloc(cap * sizeof *index);
        if (!index)
            return SIZE_MAX;
        for (size_t i = 0; i < cap; i++)
            index[i] = SIZE_MAX;
        for (size_t i = 0; i < t->n_desc; i++) {
            for (at = hash_mem(t->desc[i].mem, cap); index[at] != SIZE_MAX; at = (at + 1) & (cap - 1))
                ;
            index[at] = i;
        }
        free(t->index);
        t->index = index;
        t->index_cap = cap;
    }
    for (at = hash_mem(mem, t->index_cap); t->index[at] != SIZE_MAX; at = (at + 1) & (t->index_cap - 1))
        if (t->desc[t->index[at]].mem == mem)
            return t->index[at];
    if (WD_GROW(t->desc, t->cap_desc, t->n_desc + 1, 16))
        return SIZE_MAX;
    t->desc[t->n_desc] = (share_desc){.mem = mem, .device = device};
    t->index[at] = t->n_desc;
    return t->n_desc++;
}

/* The handles of m's slabs on `device` (-1: all) and the descriptors
 * behind them. */
static int table_build(const wd_model *m, int device, share_table *t, wd_error *err)
{
    const wa_mem *stack[16], **backing = stack;
    size_t room = sizeof stack / sizeof stack[0];
    int rc = 0;

    memset(t, 0, sizeof *t);
    if (!(t->handles = wd_calloc(m->n_slabs ? m->n_slabs : 1, sizeof *t->handles)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    for (size_t k = 0; k < m->n_slabs; k++) {
        const wd_slab *sl = &m->slabs[k];
        share_handle *h = &t->handles[k];
        wa_region reg;
        size_t n;
        if (device >= 0 && sl->device != device)
            continue;
        while ((n = wa_block_backing(sl->block, backing, room)) > room) {
            const wa_mem **more = wd_realloc(backing == stack ? NULL : backing, n * sizeof *more);
            if (!more) {
                rc = wd_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            backing = more;
            room = n;
        }
        wa_block_region(sl->block, &reg);
        h->device = sl->device;
        h->first_piece = t->n_pieces;
        h->n_pieces = n;
        h->slab_at = reg.addr - backing[0]->addr;
        h->bytes = backing[n - 1]->addr + backing[n - 1]->size - backing[0]->addr;
        t->bytes += h->bytes;
        t->n_handles++;
        for (size_t i = 0; i < n; i++) {
            const wa_mem *mem = backing[i];
            size_t d = desc_for(t, mem, sl->device);
            if (d == SIZE_MAX || WD_GROW(t->pieces, t->cap_pieces, t->n_pieces + 1, 16)) {
                rc = wd_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            /* Each piece is a whole descriptor (offset 0 in it). */
            t->pieces[t->n_pieces++] = (share_piece){.desc = (uint32_t)d, .bytes = mem->size,
                                                     .at = mem->addr - backing[0]->addr};
        }
    }
out:
    if (backing != stack)
        free(backing);
    return rc;
}

/* ---- encoding: the table as text, once per model and device ----------------- */

/* One message's list, encoded: what goes between its brackets. */
typedef struct attach_page {
    const char *list;        /* "descriptors", "handles" or "tensors" */
    char *text;
    size_t len;
    size_t first_desc, n_desc; /* descriptors: the ones whose fds travel with it */
} attach_page;

/* What every attach of one model on one device (or all) sends but the
 * lease and the request's id: the same until the model goes. Caching it
 * spares the loop the encoding (most of an attach's time in the daemon:
 * 6.5 ms of 687 tensors on the GPU machine's host). */
struct wd_attach_table {
    int device;              /* -1: every device */
    int *fds;                /* per descriptor: the daemon's (cuda, host); -1 on cuda-ipc */
    size_t n_desc, n_handles, n_tensors, n_parts;
    uint64_t bytes;
    attach_page *pages;
    size_t n_pages, cap_pages;
    wd_attach_table *next;
};

static void table_text_free(wd_attach_table *t)
{
    for (size_t i = 0; i < t->n_pages; i++)
        free(t->pages[i].text);
    free(t->pages);
    free(t->fds);
    free(t);
}

void wd_attach_forget(wd_model *m)
{
    while (m->attach_tables) {
        wd_attach_table *t = m->attach_tables;
        m->attach_tables = t->next;
        table_text_free(t);
    }
}

/* Ends arr's page (consumes arr): its text, without the brackets. */
static int add_page(wd_attach_table *at, const char *list, cJSON *arr, size_t first_desc, size_t n_desc)
{
    char *text = cJSON_PrintUnformatted(arr);
    size_t len;

    cJSON_Delete(arr);
    if (!text || WD_GROW(at->pages, at->cap_pages, at->n_pages + 1, 8)) {
        free(text);
        return -ENOMEM;
    }
    len = strlen(text);
    memmove(text, text + 1, len - 2); /* "[...]" -> "..." */
    at->pages[at->n_pages++] = (attach_page){.list = list, .text = text, .len = len - 2, .first_desc = first_desc,
                                             .n_desc = n_desc};
    return 0;
}

static int encode_descriptors(wd_server *s, const share_table *t, wd_attach_table *at)
{
    cJSON *arr = NULL;
    size_t first = 0;
    int rc = 0;

    for (size_t i = 0; i < t->n_desc && !rc; i++) {
        const share_desc *d = &t->desc[i];
        cJSON *o = cJSON_CreateObject();
        if (!arr)
            arr = cJSON_CreateArray();
        cJSON_AddNumberToObject(o, "descriptor", (double)i);
        cJSON_AddNumberToObject(o, "device", d->device);
        cJSON_AddNumberToObject(o, "bytes", (double)d->mem->size);
        if (s->backend->share == WA_SHARE_IPC) {
            unsigned char h[WA_IPC_HANDLE_BYTES];
            char hex[2 * WA_IPC_HANDLE_BYTES + 1];
            s->backend->ipc_handle(s->backend, d->mem, h);
            for (size_t b = 0; b < sizeof h; b++)
                snprintf(hex + 2 * b, 3, "%02x", h[b]);
            cJSON_AddStringToObject(o, "ipc", hex);
            at->fds[i] = -1;
        } else {
            at->fds[i] = d->mem->fd;
        }
        cJSON_AddItemToArray(arr, o);
        /* At most WP_MAX_FDS descriptors a message; IPC handles are some 200
         * bytes of text each. */
        if (i + 1 - first == WP_MAX_FDS || i + 1 == t->n_desc) {
            rc = add_page(at, "descriptors", arr, first, i + 1 - first);
            arr = NULL;
            first = i + 1;
        }
    }
    return rc;
}

/* A list cut into pages of about PAGE_BUDGET bytes of text. */
typedef struct pager {
    wd_attach_table *at;
    const char *list;
    cJSON *arr;              /* the page being filled, or NULL */
    size_t budget;           /* its estimated size */
} pager;

/* The page to add an entry to. */
static cJSON *pager_page(pager *p)
{
    if (!p->arr)
        p->arr = cJSON_CreateArray();
    return p->arr;
}

/* Ends the page being filled, if any. */
static int pager_flush(pager *p)
{
    cJSON *arr = p->arr;

    p->arr = NULL;
    p->budget = 0;
    return arr ? add_page(p->at, p->list, arr, 0, 0) : 0;
}

/* After an entry of about `cost` bytes: the page ends when full. */
static int pager_added(pager *p, size_t cost)
{
    p->budget += cost;
    return p->budget > PAGE_BUDGET ? pager_flush(p) : 0;
}

static int encode_handles(const wd_model *m, const share_table *t, wd_attach_table *at)
{
    pager pg = {.at = at, .list = "handles"};
    int rc = 0;

    for (size_t k = 0; k < m->n_slabs && !rc; k++) {
        const share_handle *h = &t->handles[k];
        cJSON *o, *pieces;
        if (!h->bytes)
            continue;
        o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "handle", (double)k);
        cJSON_AddNumberToObject(o, "device", h->device);
        cJSON_AddNumberToObject(o, "bytes", (double)h->bytes);
        pieces = cJSON_AddArrayToObject(o, "pieces");
        for (size_t i = h->first_piece; i < h->first_piece + h->n_pieces; i++) {
            const share_piece *p = &t->pieces[i];
            cJSON *po = cJSON_CreateObject();
            cJSON_AddNumberToObject(po, "descriptor", p->desc);
            cJSON_AddNumberToObject(po, "offset", 0); /* whole descriptors */
            cJSON_AddNumberToObject(po, "bytes", (double)p->bytes);
            cJSON_AddNumberToObject(po, "at", (double)p->at);
            cJSON_AddItemToArray(pieces, po);
        }
        cJSON_AddItemToArray(pager_page(&pg), o);
        rc = pager_added(&pg, 100 + 90 * h->n_pieces);
    }
    return rc ? rc : pager_flush(&pg); /* a page that failed was consumed */
}

/* Every tensor with a part on the devices attached (an empty one too), its
 * parts' places in the handles. */
static int encode_tensors(const wd_model *m, const share_table *t, int device, wd_attach_table *at)
{
    pager pg = {.at = at, .list = "tensors"};
    size_t d = 0;
    int rc = 0;

    for (size_t i = 0; i < m->ckpt.n_tensors && !rc; i++) {
        const st_tensor *st = m->ckpt.tensors[i].st;
        size_t first = d, cost;
        bool here = false;
        cJSON *o, *parts;
        for (; d < m->n_dest && m->dest[d].tensor == i; d++)
            here |= device < 0 || m->dest[d].device == device;
        if (!here)
            continue;
        o = wd_tensor_json(m, i);
        parts = cJSON_AddArrayToObject(o, "parts");
        cost = strlen(st->name) + 24 * st->ndim + 100;
        for (size_t k = first; k < d; k++) {
            const wl_dest *dd = &m->dest[k];
            const wd_part *p = &m->part[k];
            cJSON *po;
            if (p->slab == WD_NO_SLAB || (device >= 0 && dd->device != device))
                continue;
            po = cJSON_CreateObject();
            cJSON_AddNumberToObject(po, "device", dd->device);
            cJSON_AddNumberToObject(po, "handle", p->slab);
            cJSON_AddNumberToObject(po, "offset", (double)(t->handles[p->slab].slab_at + p->offset));
            cJSON_AddNumberToObject(po, "bytes", (double)dd->len);
            cJSON_AddNumberToObject(po, "tensor_offset", (double)dd->tensor_off);
            cJSON_AddItemToArray(parts, po);
            cost += 100;
            at->n_parts++;
        }
        cJSON_AddItemToArray(pager_page(&pg), o);
        at->n_tensors++;
        rc = pager_added(&pg, cost);
    }
    return rc ? rc : pager_flush(&pg); /* a page that failed was consumed */
}

/* m's table for device (-1: all), from the cache or made now. */
static int attach_table(wd_server *s, wd_model *m, int device, wd_attach_table **out, wd_error *err)
{
    wd_attach_table *at;
    share_table t;
    int rc;

    if (m->n_devices == 1)
        device = -1; /* the same table */
    for (at = m->attach_tables; at; at = at->next)
        if (at->device == device) {
            *out = at;
            return 0;
        }
    if ((rc = table_build(m, device, &t, err)))
        goto out;
    if (!(at = wd_calloc(1, sizeof *at)) || !(at->fds = wd_calloc(t.n_desc ? t.n_desc : 1, sizeof *at->fds))) {
        free(at);
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    at->device = device;
    at->n_desc = t.n_desc;
    at->n_handles = t.n_handles;
    at->bytes = t.bytes;
    if ((rc = encode_descriptors(s, &t, at)) || (rc = encode_handles(m, &t, at)) ||
        (rc = encode_tensors(m, &t, device, at))) {
        table_text_free(at);
        rc = wd_error_set(err, -ENOMEM, "out of memory encoding the attach table");
        goto out;
    }
    at->next = m->attach_tables;
    m->attach_tables = at;
    *out = at;
out:
    table_free(&t);
    return rc;
}

void wd_attach_prepare(wd_server *s, wd_model *m)
{
    wd_attach_table *at;
    wd_error err = {0};

    /* Not yet: made at the first attach instead. */
    if (s->backend->share != WA_SHARE_NONE && attach_table(s, m, -1, &at, &err))
        wd_log(WD_LOG_info, "%s: the attach table waits for the first attach: %s", m->name, wd_error_text(&err));
}

/* ---- the stream ------------------------------------------------------------------ */

/* A worker may map what it gets read-only or not at all: on host, a
 * descriptor opened read-only (a write through any mapping of it faults);
 * elsewhere the daemon's own, which the worker maps read-only by default. */
static int share_fd(wd_server *s, int fd, bool writable, wd_error *err)
{
    char path[64];
    int ro;

    if (s->backend->share != WA_SHARE_MEMFD || writable)
        return fd;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    if ((ro = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return wd_error_set(err, -errno, "reopening a segment read-only (%s): %s", path, strerror(errno));
    return ro;
}

/* head (consumed) with LIST: [page] as one line. */
static char *page_line(cJSON *head, const attach_page *pg, size_t *len)
{
    char *text, *line = NULL;
    size_t n;

    if ((text = cJSON_PrintUnformatted(head)) && (n = strlen(text)) &&
        (line = wd_malloc(n + strlen(pg->list) + pg->len + 8))) {
        /* the header without its closing brace, then the list */
        *len = (size_t)sprintf(line, "%.*s,\"%s\":[", (int)(n - 1), text, pg->list);
        memcpy(line + *len, pg->text, pg->len);
        *len += pg->len;
        memcpy(line + *len, "]}\n", 3);
        *len += 3;
    }
    free(text);
    cJSON_Delete(head);
    return line;
}

/* Every page of at: 0, -ECONNRESET when the client went away, or a negative
 * errno with err set. */
static int send_table(wd_server *s, wd_request *r, const wd_lease *l, const wd_attach_table *at, size_t *messages,
                      wd_error *err)
{
    int rc = 0;

    for (size_t i = 0; i < at->n_pages && !rc; i++) {
        const attach_page *pg = &at->pages[i];
        int fds[WP_MAX_FDS];
        size_t n_fds = 0, len = 0;
        char *line = NULL;
        for (; s->backend->share != WA_SHARE_IPC && n_fds < pg->n_desc; n_fds++)
            if ((fds[n_fds] = share_fd(s, at->fds[pg->first_desc + n_fds], l->writable, err)) < 0) {
                rc = fds[n_fds];
                break;
            }
        if (!rc) {
            cJSON *head = wp_event_new(r->id, "attach");
            cJSON_AddNumberToObject(head, "lease", (double)l->id);
            if (!(line = page_line(head, pg, &len)))
                rc = wd_error_set(err, -ENOMEM, "out of memory");
        }
        if (!rc) {
            (*messages)++;
            if (!wd_request_send(r, line, len, fds, n_fds)) /* duplicates them */
                rc = -ECONNRESET;
        }
        for (size_t k = 0; k < n_fds; k++)
            if (fds[k] != at->fds[pg->first_desc + k])
                close(fds[k]);
    }
    return rc;
}

int wd_attach_send_wake(wd_server *s, wd_lease *l, wd_error *err)
{
    wd_attach_table *at;
    int rc;

    if (!l->conn)
        return 0;
    if ((rc = attach_table(s, l->model, l->device, &at, err)))
        return rc;
    for (size_t i = 0; i < at->n_pages && !rc; i++) {
        const attach_page *pg = &at->pages[i];
        int fds[WP_MAX_FDS];
        size_t n_fds = 0, len = 0;
        char *line;
        cJSON *head;
        if (strcmp(pg->list, "descriptors") != 0)
            continue;
        for (; s->backend->share != WA_SHARE_IPC && n_fds < pg->n_desc; n_fds++)
            if ((fds[n_fds] = share_fd(s, at->fds[pg->first_desc + n_fds], l->writable, err)) < 0) {
                rc = fds[n_fds];
                break;
            }
        head = cJSON_CreateObject();
        cJSON_AddStringToObject(head, "event", "wake");
        cJSON_AddNumberToObject(head, "lease", (double)l->id);
        cJSON_AddStringToObject(head, "name", l->model->name);
        cJSON_AddNumberToObject(head, "descriptors_total", (double)at->n_desc);
        if (!rc && !(line = page_line(head, pg, &len)))
            rc = wd_error_set(err, -ENOMEM, "out of memory");
        else if (!rc)
            wd_conn_send(l->conn, line, len, fds, n_fds); /* a client gone ends its lease on its own */
        else
            cJSON_Delete(head);
        for (size_t k = 0; k < n_fds; k++)
            if (fds[k] != at->fds[pg->first_desc + k])
                close(fds[k]);
    }
    return rc;
}

static const char *share_name(wa_share share)
{
    return share == WA_SHARE_MEMFD ? "memfd" : share == WA_SHARE_VMM ? "cuda-vmm" : "cuda-ipc";
}

/* What the stream's first message says, and the reply again: how to map
 * the handles, and which devices they are on (by UUID: a worker's CUDA
 * numbers may differ from the daemon's). */
static void describe_attach(wd_server *s, const wd_model *m, const wd_lease *l, cJSON *o)
{
    cJSON *devs;

    cJSON_AddStringToObject(o, "name", m->name);
    cJSON_AddStringToObject(o, "backend", s->backend->name);
    cJSON_AddStringToObject(o, "handle_type", share_name(s->backend->share));
    cJSON_AddBoolToObject(o, "writable", l->writable);
    devs = cJSON_AddArrayToObject(o, "devices");
    for (size_t i = 0; i < m->n_devices; i++) {
        wa_device_info info;
        cJSON *d;
        if (l->device >= 0 && m->devices[i] != l->device)
            continue;
        s->backend->describe(s->backend, m->devices[i], &info);
        d = cJSON_CreateObject();
        cJSON_AddNumberToObject(d, "device", m->devices[i]);
        cJSON_AddStringToObject(d, "uuid", info.uuid);
        cJSON_AddItemToArray(devs, d);
    }
}

/* ---- the operations ---------------------------------------------------------- */

/* {"name", "device"?, "writable"?} */
int wd_op_attach(wd_server *s, wd_request *r)
{
    const cJSON *dev_arg = cJSON_GetObjectItemCaseSensitive(r->args, "device");
    const char *name;
    bool writable = false;
    int device = -1, rc;
    size_t messages = 0, len = 0;
    char *line;
    double t0 = wd_now();
    wd_attach_table *at = NULL;
    wd_model *m;
    wd_lease *l;
    cJSON *res, *first;

    if ((rc = wp_arg_string(r->args, "name", true, &name, &r->err)) ||
        (rc = wp_arg_bool(r->args, "writable", &writable, &r->err)) == -EINVAL)
        return rc;
    if (dev_arg && !cJSON_IsNull(dev_arg) && (rc = wd_device_arg(s, r, dev_arg, &device)))
        return rc;
    if (!(m = wd_registry_find(s, name)))
        return wd_error_set(&r->err, -ENOENT, "no model named \"%s\" is loaded", name);
    if (m->state == WD_MODEL_LOADING)
        return wd_error_set(&r->err, -EAGAIN, "model \"%s\" is still loading; attach once it is ready", name);
    if (m->state != WD_MODEL_READY)
        return wd_error_set(&r->err, -EBUSY, "model \"%s\" is %s", name, wd_model_state_name(m->state));
    if (s->backend->share == WA_SHARE_NONE)
        return wd_error_set(&r->err, -ENOTSUP, "the %s backend holds no memory a worker could map", s->backend->name);
    if (device >= 0) {
        size_t i = 0;
        char devs_text[128];
        while (i < m->n_devices && m->devices[i] != device)
            i++;
        if (i == m->n_devices)
            return wd_error_set(&r->err, -ENODEV, "model \"%s\" is not on device %d (it is on %s)", name, device,
                                wd_model_devices_text(m, devs_text, sizeof devs_text));
    }
    if (writable && !(s->conf->attach_writable && wd_conn_privileged(r->conn)))
        return wd_error_set(&r->err, -EPERM, "%s", s->conf->attach_writable
                                ? "attaching writable is only for the daemon's own user or root"
                                : "this daemon gives read-only mappings only (attach_writable is off)");
    if ((rc = wd_lease_new(s, r, m, device, writable, &l, &r->err)))
        return rc;
    if ((rc = attach_table(s, m, device, &at, &r->err))) {
        wd_lease_end(s, l, "attach failed");
        return rc;
    }
    /* From here a send may find the client gone: r is answered to nobody,
     * and the lease ends when the loop closes the connection. */
    first = wp_event_new(r->id, "attach");
    cJSON_AddNumberToObject(first, "lease", (double)l->id);
    describe_attach(s, m, l, first);
    line = wp_encode(first, &len);
    cJSON_Delete(first);
    messages++;
    rc = wd_request_send(r, line, len, NULL, 0) ? send_table(s, r, l, at, &messages, &r->err) : -ECONNRESET;
    if (rc == -ECONNRESET) {
        wd_reply_ok(r, NULL);
        return 0;
    }
    if (rc) {
        wd_lease_end(s, l, "attach failed");
        return rc;
    }
    res = cJSON_CreateObject();
    cJSON_AddNumberToObject(res, "lease", (double)l->id);
    /* Its holder's alone: with it, the client takes the lease again from
     * the next daemon after a restart (reattach). */
    cJSON_AddStringToObject(res, "token", l->token);
    describe_attach(s, m, l, res);
    cJSON_AddNumberToObject(res, "descriptors", (double)at->n_desc);
    cJSON_AddNumberToObject(res, "handles", (double)at->n_handles);
    cJSON_AddNumberToObject(res, "tensors", (double)at->n_tensors);
    cJSON_AddNumberToObject(res, "parts", (double)at->n_parts);
    cJSON_AddNumberToObject(res, "bytes", (double)at->bytes);
    cJSON_AddNumberToObject(res, "messages", (double)messages);
    cJSON_AddNumberToObject(res, "daemon_seconds", wd_now() - t0);
    wd_reply_ok(r, res);
    return 0;
}

/* {"lease"}: one of this connection's own. */
int wd_op_detach(wd_server *s, wd_request *r)
{
    int64_t id;
    wd_lease *l;
    cJSON *res;
    int rc;

    if ((rc = wp_arg_int(r->args, "lease", true, 1, INT64_MAX / 2, &id, &r->err)))
        return rc;
    if (!(l = wd_lease_find(r->conn, (uint64_t)id)))
        return wd_error_set(&r->err, -ENOENT, "this connection holds no lease %lld", (long long)id);
    res = cJSON_CreateObject();
    cJSON_AddNumberToObject(res, "lease", (double)id);
    cJSON_AddStringToObject(res, "name", l->model->name);
    /* The end may finish a forced unload (which frees the model and answers
     * its own client): the reply holds a copy of the name. */
    wd_lease_end(s, l, "detached");
    wd_reply_ok(r, res);
    return 0;
}

/* {"token"}: the lease an attach gave this user's worker, after a daemon
 * restart: its mappings never went, so nothing is sent but the lease. */
int wd_op_reattach(wd_server *s, wd_request *r)
{
    const char *token;
    wd_lease *l;
    cJSON *res;
    int rc;

    if ((rc = wp_arg_string(r->args, "token", true, &token, &r->err)))
        return rc;
    if ((rc = wd_lease_reattach(s, r, token, &l, &r->err)))
        return rc;
    res = cJSON_CreateObject();
    cJSON_AddNumberToObject(res, "lease", (double)l->id);
    cJSON_AddStringToObject(res, "name", l->model->name);
    if (l->device >= 0)
        cJSON_AddNumberToObject(res, "device", l->device);
    else
        cJSON_AddNullToObject(res, "device");
    wd_reply_ok(r, res);
    return 0;
}

/* {"offset"?}: every lease of every model that the caller may see (its
 * own uid's, or all for an administrator), a page at a time. */
int wd_op_leases(wd_server *s, wd_request *r)
{
    int64_t offset = 0, i = 0;
    cJSON *res, *arr;
    int rc;

    if ((rc = wp_arg_int(r->args, "offset", false, 0, INT32_MAX, &offset, &r->err)) == -EINVAL)
        return rc;
    res = cJSON_CreateObject();
    arr = cJSON_AddArrayToObject(res, "leases");
    for (wd_model *m = s->models; m; m = m->next)
        for (wd_lease *l = m->leases; l; l = l->model_next) {
            if (!wd_lease_visible(l, r->conn))
                continue;
            if (i >= offset && i < offset + LEASES_PAGE)
                cJSON_AddItemToArray(arr, wd_lease_json(l));
            i++;
        }
    if (i > offset + LEASES_PAGE)
        cJSON_AddNumberToObject(res, "next", (double)(offset + LEASES_PAGE));
    else
        cJSON_AddNullToObject(res, "next");
    wd_reply_ok(r, res);
    return 0;
}
