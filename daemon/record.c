/* The registry's record: what a new daemon needs to serve the models an
 * earlier one held, from the descriptors systemd's fd store kept (their
 * memory's pieces and their checkpoint files). Its one format lives here.
 *
 * A record is a sealed memfd holding one header line and a JSON document:
 *   weightd-registry VERSION XXH3-OF-BODY BODY-BYTES\n
 *   {"generation": G, "backend": "host", "devices": [uuid...], "models": [...]}
 * Each model names its descriptors (FDNAME= in the store):
 *   {"name", "path", "devices": [n], "placement", "slab_size", "load_seconds",
 *    "loaded_at", "sums": [hex] | null, "index_path": p | null,
 *    "shards": [{"path", "fd", "size", "mtime": [s, ns], "header"}],
 *    "slabs": [{"device", "bytes", "pieces": [{"fd", "size"}]}]}
 * Each lease of a stored model is a small sealed memfd of its own, beside
 * the record (attaches come and go far more often than models):
 *   {"model", "token", "uid", "pid", "process", "device", "writable"}
 * A new daemon checks everything against what it got back and drops what
 * does not match: a model is served as it was, or not at all. */
#include "daemon/daemon.h"
#include "daemon/lease.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checksum.h"
#include "common/size.h"
#include "common/fault.h"

#define RECORD_MAGIC "weightd-registry"
#define RECORD_MAX (1ull << 30)

static int sealed_memfd(const char *name, const char *text, size_t len, int *out, wd_error *err);

/* ---- writing ------------------------------------------------------------------ */

static cJSON *shard_json(const wl_shard *sh, const char *fd_name, wd_error *err)
{
    cJSON *o = cJSON_CreateObject(), *mt;
    char *header = NULL;
    size_t len;

    if (!o || wl_shard_header(sh, &header, &len, err)) {
        cJSON_Delete(o);
        return NULL;
    }
    cJSON_AddStringToObject(o, "path", sh->path);
    cJSON_AddStringToObject(o, "fd", fd_name);
    cJSON_AddNumberToObject(o, "size", (double)sh->file_size);
    mt = cJSON_AddArrayToObject(o, "mtime");
    cJSON_AddItemToArray(mt, cJSON_CreateNumber((double)sh->mtime.tv_sec));
    cJSON_AddItemToArray(mt, cJSON_CreateNumber((double)sh->mtime.tv_nsec));
    cJSON_AddStringToObject(o, "header", header);
    free(header);
    return o;
}

int wd_record_model(wd_model *m, char *const *names, wd_error *err)
{
    cJSON *o = cJSON_CreateObject(), *a;
    const wa_mem *backing[64];
    size_t k = 0;
    int rc = 0;

    if (!o)
        return wd_error_set(err, -ENOMEM, "out of memory");
    cJSON_AddStringToObject(o, "name", m->name);
    cJSON_AddStringToObject(o, "path", m->path);
    cJSON_AddItemToObject(o, "devices", wd_model_devices_json(m));
    cJSON_AddStringToObject(o, "placement", wl_placement_name(m->placement));
    cJSON_AddNumberToObject(o, "slab_size", (double)m->slab_size);
    cJSON_AddNumberToObject(o, "load_seconds", m->load_seconds);
    cJSON_AddNumberToObject(o, "loaded_at", m->loaded_at);
    if (m->sums) {
        char hex[24];
        a = cJSON_AddArrayToObject(o, "sums");
        for (size_t i = 0; i < m->ckpt.n_tensors; i++)
            cJSON_AddItemToArray(a, cJSON_CreateString(wd_sum_format(m->sums[i], hex)));
    } else {
        cJSON_AddNullToObject(o, "sums");
    }
    a = cJSON_AddArrayToObject(o, "slabs");
    for (size_t i = 0; i < m->n_slabs; i++) {
        cJSON *sl = cJSON_CreateObject(), *pieces;
        size_t n = wa_block_backing(m->slabs[i].block, backing, 64);
        cJSON_AddItemToArray(a, sl);
        cJSON_AddNumberToObject(sl, "device", m->slabs[i].device);
        cJSON_AddNumberToObject(sl, "bytes", (double)m->slabs[i].bytes);
        pieces = cJSON_AddArrayToObject(sl, "pieces");
        for (size_t p = 0; p < n && p < 64; p++, k++) {
            cJSON *pc = cJSON_CreateObject();
            cJSON_AddItemToArray(pieces, pc);
            cJSON_AddStringToObject(pc, "fd", names[k]);
            cJSON_AddNumberToObject(pc, "size", (double)backing[p]->size);
        }
    }
    if (m->ckpt.index_path)
        cJSON_AddStringToObject(o, "index_path", m->ckpt.index_path);
    else
        cJSON_AddNullToObject(o, "index_path");
    a = cJSON_AddArrayToObject(o, "shards");
    for (size_t i = 0; i < m->ckpt.n_shards && !rc; i++, k++) {
        cJSON *sh = shard_json(&m->ckpt.shards[i], names[k], err);
        if (!sh)
            rc = err->code ? err->code : -ENOMEM;
        else
            cJSON_AddItemToArray(a, sh);
    }
    free(m->record);
    m->record = rc ? NULL : cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!rc && !m->record)
        rc = wd_error_set(err, -ENOMEM, "out of memory");
    return rc;
}

int wd_record_write(wd_server *s, uint64_t generation, int *out, wd_error *err)
{
    char head[128], num[32], *body = NULL;
    size_t len = 0, cap = 0, n;
    int rc = 0;
    wa_device_info info;

#define APPEND(text, tlen)                                                          \
    do {                                                                            \
        size_t l_ = (tlen);                                                         \
        if (len + l_ + 1 > cap) {                                                   \
            size_t c_ = (len + l_ + 1) * 2;                                         \
            char *b_ = wd_realloc(body, c_);                                           \
            if (!b_) {                                                              \
                rc = wd_error_set(err, -ENOMEM, "out of memory for the record");    \
                goto out;                                                           \
            }                                                                       \
            body = b_;                                                              \
            cap = c_;                                                               \
        }                                                                           \
        memcpy(body + len, (text), l_);                                             \
        len += l_;                                                                  \
        body[len] = '\0';                                                           \
    } while (0)

    n = (size_t)snprintf(num, sizeof num, "%" PRIu64, generation);
    APPEND("{\"generation\":", 14);
    APPEND(num, n);
    APPEND(",\"backend\":\"", 12);
    APPEND(s->backend->name, strlen(s->backend->name));
    APPEND("\",\"devices\":[", 13);
    for (int d = 0; d < s->backend->n_devices; d++) {
        s->backend->describe(s->backend, d, &info);
        if (d)
            APPEND(",", 1);
        APPEND("\"", 1);
        APPEND(info.uuid, strlen(info.uuid));
        APPEND("\"", 1);
    }
    APPEND("],\"models\":[", 12);
    n = 0;
    for (wd_model *m = s->models; m; m = m->next)
        if (m->record) {
            if (n++)
                APPEND(",", 1);
            APPEND(m->record, strlen(m->record));
        }
    APPEND("]}", 2);
#undef APPEND
    n = (size_t)snprintf(head, sizeof head, "%s %d %016" PRIx64 " %zu\n", RECORD_MAGIC, WD_RECORD_VERSION,
                         wd_sum_block(body, len, 0), len);
    {
        /* The header line before the body, in one buffer. */
        char *all = wd_malloc(n + len);
        if (!all) {
            rc = wd_error_set(err, -ENOMEM, "out of memory for the record");
            goto out;
        }
        memcpy(all, head, n);
        memcpy(all + n, body, len);
        rc = sealed_memfd("weightd-registry", all, n + len, out, err);
        free(all);
    }
out:
    free(body);
    return rc;
}

/* ---- reading ------------------------------------------------------------------ */

/* The descriptor named name among those systemd passed, taken (-1 there);
 * m keeps the name: the descriptor stays in the store for it. */
static int take_fd(wd_passed *p, wd_model *m, const char *name)
{
    for (size_t i = 0; name && i < p->n; i++)
        if (p->fds[i] >= 0 && strcmp(p->names[i], name) == 0) {
            char **names = wd_realloc(m->stored, (m->n_stored + 1) * sizeof *names);
            int fd = p->fds[i];
            if (!names || !(names[m->n_stored] = wd_strdup(name))) {
                if (names)
                    m->stored = names;
                return -1;
            }
            m->stored = names;
            m->n_stored++;
            p->fds[i] = -1;
            return fd;
        }
    return -1;
}

static double num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

/* Field key of o as a whole number in [min, max]; a record that holds
 * anything else is not one of ours (a cast of such a double would be
 * undefined). */
#define BIG ((int64_t)1 << 53)
static int whole_value(const cJSON *v, const char *what, int64_t min, int64_t max, int64_t *out, wd_error *err)
{
    return wp_int_value(v, what, min, max, out, err) ? (err->code = -EBADMSG) : 0;
}

static int whole(const cJSON *o, const char *key, int64_t min, int64_t max, int64_t *out, wd_error *err)
{
    return whole_value(cJSON_GetObjectItemCaseSensitive(o, key), key, min, max, out, err);
}

static const char *str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

#define BAD(...) (rc = wd_error_set(err, -EBADMSG, __VA_ARGS__))

/* The checkpoint of model o, from its shards' kept files and saved headers. */
static int restore_checkpoint(wd_model *m, const cJSON *o, wd_passed *p, wd_error *err)
{
    const cJSON *shards = cJSON_GetObjectItemCaseSensitive(o, "shards"), *sh;
    wl_saved_shard *sv = NULL;
    size_t n = 0;
    int64_t size, sec, nsec;
    int rc = 0;

    if (!cJSON_IsArray(shards) || !(n = (size_t)cJSON_GetArraySize(shards)))
        return BAD("no shards");
    if (!(sv = wd_calloc(n, sizeof *sv)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    n = 0;
    cJSON_ArrayForEach(sh, shards) {
        const cJSON *mt = cJSON_GetObjectItemCaseSensitive(sh, "mtime");
        wl_saved_shard *v = &sv[n++];
        v->path = str(sh, "path");
        v->header = str(sh, "header");
        v->fd = take_fd(p, m, str(sh, "fd"));
        if ((rc = whole(sh, "size", 0, BIG, &size, err)) ||
            (rc = whole_value(cJSON_GetArrayItem(mt, 0), "mtime's seconds", -BIG, BIG, &sec, err)) ||
            (rc = whole_value(cJSON_GetArrayItem(mt, 1), "mtime's nanoseconds", 0, 999999999, &nsec, err))) {
            wd_error_prefix(err, "shard %zu", n);
            goto out;
        }
        v->file_size = (uint64_t)size;
        v->mtime = (struct timespec){.tv_sec = (time_t)sec, .tv_nsec = (long)nsec};
        if (!v->path || !v->header || v->fd < 0) {
            BAD("shard %zu: %s", n, v->fd < 0 ? "its file did not come back" : "incomplete");
            goto out;
        }
        v->header_len = strlen(v->header);
    }
    rc = wl_checkpoint_reopen(m->path, str(o, "index_path"), sv, n, &m->ckpt, err);
    n = 0; /* taken */
out:
    for (size_t i = 0; i < n; i++)
        if (sv[i].fd >= 0)
            close(sv[i].fd);
    free(sv);
    return rc;
}

/* Slab k of the plan made again, which must be sl, the saved one: its
 * memory is its saved pieces, adopted by the allocator. */
static int restore_slab(wd_server *s, wd_model *m, size_t k, const cJSON *sl, wd_passed *p, wd_error *err)
{
    const cJSON *pieces = cJSON_GetObjectItemCaseSensitive(sl, "pieces"), *pc;
    wa_piece got[64];
    size_t n = 0;
    uint64_t page = 0;
    int64_t device, bytes, size;
    wa_block *block;
    int rc = 0;

    if ((rc = whole(sl, "device", 0, 63, &device, err)) || (rc = whole(sl, "bytes", 1, BIG, &bytes, err))) {
        wd_error_prefix(err, "slab %zu", k + 1);
        return rc;
    }
    if ((int)device != m->slabs[k].device || (uint64_t)bytes != m->slabs[k].bytes)
        return BAD("slab %zu: saved on device %d with %" PRId64 " bytes, planned on %d with %" PRIu64, k + 1,
                   (int)device, bytes, m->slabs[k].device, m->slabs[k].bytes);
    if (!cJSON_IsArray(pieces) || cJSON_GetArraySize(pieces) < 1 || cJSON_GetArraySize(pieces) > 64)
        return BAD("slab %zu: no pieces", k + 1);
    cJSON_ArrayForEach(pc, pieces) {
        int fd = take_fd(p, m, str(pc, "fd"));
        if (fd < 0 || (rc = whole(pc, "size", 1, BIG, &size, err))) {
            if (fd >= 0)
                close(fd);
            if (rc)
                wd_error_prefix(err, "slab %zu: piece %zu", k + 1, n + 1);
            else
                BAD("slab %zu: piece %zu did not come back", k + 1, n + 1);
            goto out;
        }
        got[n++] = (wa_piece){.fd = fd, .size = (uint64_t)size};
        page = gcd(page, (uint64_t)size);
    }
    if ((rc = wa_adopt(s->alloc, m->slabs[k].device, got, n, page, m->slabs[k].bytes, &block, err))) {
        wd_error_prefix(err, "slab %zu", k + 1);
        goto out;
    }
    wd_model_slab_placed(m, block);
    n = 0; /* the allocator has them */
out:
    for (size_t i = 0; i < n; i++)
        close(got[i].fd);
    return rc;
}

static int restore_slabs(wd_server *s, wd_model *m, const cJSON *o, wd_passed *p, wd_error *err)
{
    const cJSON *slabs = cJSON_GetObjectItemCaseSensitive(o, "slabs"), *sl;
    size_t k = 0;
    int rc = 0;

    if ((size_t)cJSON_GetArraySize(slabs) != m->n_slabs)
        return BAD("%d slabs saved, %zu planned", cJSON_GetArraySize(slabs), m->n_slabs);
    cJSON_ArrayForEach(sl, slabs)
        if ((rc = restore_slab(s, m, k++, sl, p, err)))
            return rc;
    return 0;
}

/* Model o of the record, READY again, or an error saying what did not match. */
static int restore_model(wd_server *s, const cJSON *o, wd_passed *p, wd_error *err)
{
    const cJSON *devs = cJSON_GetObjectItemCaseSensitive(o, "devices"), *d, *sums;
    const char *name = str(o, "name"), *path = str(o, "path"), *pl = str(o, "placement");
    int devices[64];
    size_t n_dev = 0;
    int64_t slab_size;
    wl_placement placement;
    wd_model *m = NULL;
    int rc;

    if (!name || !path || !pl || wl_placement_parse(pl, &placement) || !cJSON_IsArray(devs))
        return BAD("a model without its name, path, placement or devices");
    cJSON_ArrayForEach(d, devs) {
        int64_t dev;
        if (n_dev == 64 || whole_value(d, "device", 0, s->backend->n_devices - 1, &dev, err))
            return BAD("model %s: a device that is not one of this daemon's", name);
        devices[n_dev++] = (int)dev;
    }
    if ((rc = whole(o, "slab_size", 0, BIG, &slab_size, err))) {
        wd_error_prefix(err, "model %s", name);
        return rc;
    }
    if ((rc = wd_registry_add(s, name, path, devices, n_dev, placement, &m, err)))
        return rc;
    if ((rc = restore_checkpoint(m, o, p, err)) ||
        (rc = wd_model_place(m, (uint64_t)slab_size, !cJSON_IsNull(cJSON_GetObjectItem(o, "sums")), err)) ||
        (rc = restore_slabs(s, m, o, p, err)))
        goto fail;
    if (m->sums) {
        size_t i = 0;
        const cJSON *h;
        sums = cJSON_GetObjectItemCaseSensitive(o, "sums");
        if ((size_t)cJSON_GetArraySize(sums) != m->ckpt.n_tensors) {
            BAD("%d checksums for %zu tensors", cJSON_GetArraySize(sums), m->ckpt.n_tensors);
            goto fail;
        }
        cJSON_ArrayForEach(h, sums) {
            if (!cJSON_IsString(h) || wd_sum_parse(h->valuestring, &m->sums[i++])) {
                BAD("checksum %zu is not one", i);
                goto fail;
            }
        }
    }
    m->load_seconds = num(o, "load_seconds");
    m->loaded_at = num(o, "loaded_at");
    if (!(m->record = cJSON_PrintUnformatted(o))) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    m->state = WD_MODEL_READY;
    m->restored = true;
    return 0;
fail:
    wd_error_prefix(err, "model %s", name);
    wd_registry_remove(s, m, true);
    return rc;
}

/* The record's body, checked: its version, length and checksum. */
static int read_record(int fd, char **body, size_t *len, wd_error *err)
{
    struct stat st;
    char *text = NULL, *nl;
    unsigned version;
    uint64_t sum;
    size_t blen;
    int seals = fcntl(fd, F_GET_SEALS), rc = 0, used = 0;

    if (fstat(fd, &st) < 0 || seals < 0 || !(seals & F_SEAL_WRITE))
        return BAD("not a sealed memfd");
    if ((uint64_t)st.st_size > RECORD_MAX || st.st_size < 16)
        return BAD("%lld bytes", (long long)st.st_size);
    if (!(text = wd_malloc((size_t)st.st_size + 1)))
        return wd_error_set(err, -ENOMEM, "out of memory");
    if (pread(fd, text, (size_t)st.st_size, 0) != st.st_size) {
        rc = wd_error_set(err, -EIO, "reading it: %s", strerror(errno));
        goto out;
    }
    text[st.st_size] = '\0';
    if (!(nl = memchr(text, '\n', (size_t)st.st_size)) ||
        sscanf(text, RECORD_MAGIC " %u %" SCNx64 " %zu%n", &version, &sum, &blen, &used) != 3 || text + used != nl) {
        BAD("no record header");
        goto out;
    }
    if (version != WD_RECORD_VERSION) {
        BAD("format version %u; this weightd reads version %d", version, WD_RECORD_VERSION);
        goto out;
    }
    if ((size_t)(text + st.st_size - (nl + 1)) != blen || wd_sum_block(nl + 1, blen, 0) != sum) {
        BAD("truncated or corrupted (its length or checksum does not match)");
        goto out;
    }
    memmove(text, nl + 1, blen + 1);
    *body = text;
    *len = blen;
    text = NULL;
out:
    free(text);
    return rc;
}

int wd_record_restore(wd_server *s, int fd, wd_passed *p, uint64_t *generation, wd_error *err)
{
    char *body = NULL;
    size_t len = 0, restored = 0, dropped = 0;
    cJSON *doc = NULL, *devs, *models, *o;
    wa_device_info info;
    int64_t gen;
    int rc, i = 0;

    if ((rc = read_record(fd, &body, &len, err)))
        return rc;
    if (!(doc = cJSON_ParseWithLength(body, len))) {
        BAD("not JSON");
        goto out;
    }
    if ((rc = whole(doc, "generation", 0, BIG, &gen, err))) {
        wd_error_prefix(err, "the record");
        goto out;
    }
    *generation = (uint64_t)gen;
    devs = cJSON_GetObjectItemCaseSensitive(doc, "devices");
    if (!str(doc, "backend") || strcmp(str(doc, "backend"), s->backend->name) != 0) {
        BAD("made by the %s backend; this daemon runs %s", str(doc, "backend") ? str(doc, "backend") : "?",
                 s->backend->name);
        goto out;
    }
    if (cJSON_GetArraySize(devs) != s->backend->n_devices) {
        BAD("made with %d devices; this daemon has %d", cJSON_GetArraySize(devs), s->backend->n_devices);
        goto out;
    }
    cJSON_ArrayForEach(o, devs) {
        s->backend->describe(s->backend, i, &info);
        if (!cJSON_IsString(o) || strcmp(o->valuestring, info.uuid) != 0) {
            BAD("device %d was %s, and is %s now", i, cJSON_IsString(o) ? o->valuestring : "?", info.uuid);
            goto out;
        }
        i++;
    }
    models = cJSON_GetObjectItemCaseSensitive(doc, "models");
    cJSON_ArrayForEach(o, models) {
        wd_error merr = {0};
        if (restore_model(s, o, p, &merr)) {
            wd_log(WD_LOG_warning, "fd store: dropped: %s", wd_error_text(&merr));
            dropped++;
            continue;
        }
        restored++;
    }
    for (wd_model *m = s->models; m; m = m->next) {
        char size[32], where[128];
        if (m->restored)
            wd_log(WD_LOG_notice, "restored %s from the fd store: %zu tensors, %s on device %s, not read again",
                   m->name, m->ckpt.n_tensors, wd_size_format(m->device_bytes, size, sizeof size),
                   wd_model_devices_text(m, where, sizeof where));
    }
    if (dropped)
        wd_log(WD_LOG_warning, "fd store: %zu of %zu models dropped (above: why); nothing of theirs is served",
               dropped, dropped + restored);
    rc = (int)restored;
out:
    cJSON_Delete(doc);
    free(body);
    return rc;
}

/* ---- leases -------------------------------------------------------------------- */

static int sealed_memfd(const char *name, const char *text, size_t len, int *out, wd_error *err)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);

    if (fd < 0)
        return wd_error_set(err, -errno, "memfd_create: %s", strerror(errno));
    if (write(fd, text, len) != (ssize_t)len ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) {
        int rc = wd_error_set(err, errno ? -errno : -EIO, "writing %s: %s", name, strerror(errno ? errno : EIO));
        close(fd);
        return rc;
    }
    *out = fd;
    return 0;
}

int wd_record_lease(const wd_lease *l, int *fd, wd_error *err)
{
    cJSON *o = cJSON_CreateObject();
    char *text;
    int rc;

    cJSON_AddStringToObject(o, "model", l->model->name);
    cJSON_AddStringToObject(o, "token", l->token);
    cJSON_AddNumberToObject(o, "uid", (double)l->uid);
    cJSON_AddNumberToObject(o, "pid", (double)l->pid);
    cJSON_AddStringToObject(o, "process", l->process);
    cJSON_AddNumberToObject(o, "device", l->device);
    cJSON_AddBoolToObject(o, "writable", l->writable);
    text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!text)
        return wd_error_set(err, -ENOMEM, "out of memory");
    rc = sealed_memfd("weightd-lease", text, strlen(text), fd, err);
    free(text);
    return rc;
}

void wd_record_restore_leases(wd_server *s, wd_passed *p, const char *prefix)
{
    for (size_t i = 0; i < p->n; i++) {
        char text[2048];
        int64_t uid, pid, device;
        ssize_t n;
        cJSON *o;
        wd_model *m;
        wd_error err = {0};
        int seals;
        if (p->fds[i] < 0 || strncmp(p->names[i], prefix, strlen(prefix)) != 0)
            continue;
        seals = fcntl(p->fds[i], F_GET_SEALS);
        n = pread(p->fds[i], text, sizeof text - 1, 0);
        close(p->fds[i]);
        p->fds[i] = -1;
        text[n > 0 ? n : 0] = '\0';
        o = seals >= 0 && (seals & F_SEAL_WRITE) && n > 0 ? cJSON_Parse(text) : NULL;
        m = str(o, "model") ? wd_registry_find(s, str(o, "model")) : NULL;
        if (!m || !str(o, "token") || whole(o, "uid", 0, UINT32_MAX - 1, &uid, &err) ||
            whole(o, "pid", 1, INT32_MAX, &pid, &err) || whole(o, "device", -1, 63, &device, &err) ||
            wd_lease_restore(s, m, str(o, "token"), (uid_t)uid, (pid_t)pid, str(o, "process") ? str(o, "process") : "?",
                             (int)device, cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "writable")), &err))
            wd_log(WD_LOG_info, "fd store: lease %s dropped: %s", p->names[i],
                   !o ? "not a lease record" : !m ? "its model did not come back" : wd_error_text(&err));
        cJSON_Delete(o);
    }
}
