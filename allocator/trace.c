/* Trace parsing and replay. IDs are resolved to slots once at parse time, so
 * a replay is a flat loop over an array: a million operations take well
 * under a second. */
#include "allocator/trace.h"

#include <ctype.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "allocator/allocator.h"
#include "common/grow.h"

typedef enum op_kind { OP_ALLOC, OP_FREE, OP_POLICY, OP_MARK } op_kind;

typedef struct trace_op {
    op_kind kind;
    int device;
    uint32_t slot;     /* alloc/free: the block's slot */
    uint64_t bytes;    /* alloc */
    uint32_t text;     /* policy/mark: index into texts */
    uint32_t line;
} trace_op;

struct wa_trace {
    char *name;
    trace_op *ops;
    size_t n_ops, cap_ops;
    char **texts;
    size_t n_texts, cap_texts;
    uint32_t n_slots;
    int n_devices;
    uint64_t peak_live;
};

/* ---- an ID table: open addressing over the ID strings ------------------ */

typedef struct id_table {
    char **keys;
    uint32_t *slots;
    bool *live;
    size_t cap, n;
} id_table;

static uint64_t hash_str(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

static int ids_grow(id_table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 1024;
    id_table g = {calloc(cap, sizeof(char *)), calloc(cap, sizeof(uint32_t)), calloc(cap, sizeof(bool)), cap, 0};

    if (!g.keys || !g.slots || !g.live) {
        free(g.keys); free(g.slots); free(g.live);
        return -ENOMEM;
    }
    for (size_t i = 0; i < t->cap; i++) {
        if (!t->keys[i])
            continue;
        size_t j = hash_str(t->keys[i], strlen(t->keys[i])) & (cap - 1);
        while (g.keys[j])
            j = (j + 1) & (cap - 1);
        g.keys[j] = t->keys[i];
        g.slots[j] = t->slots[i];
        g.live[j] = t->live[i];
        g.n++;
    }
    free(t->keys); free(t->slots); free(t->live);
    *t = g;
    return 0;
}

/* Finds or adds the ID; *idx is its table position. */
static int ids_find(id_table *t, const char *s, size_t n, bool add, size_t *idx)
{
    size_t j;

    if (add && (t->n + 1) * 2 > t->cap && ids_grow(t))
        return -ENOMEM;
    if (!t->cap)
        return -ENOENT;
    j = hash_str(s, n) & (t->cap - 1);
    while (t->keys[j]) {
        if (strlen(t->keys[j]) == n && memcmp(t->keys[j], s, n) == 0) {
            *idx = j;
            return 0;
        }
        j = (j + 1) & (t->cap - 1);
    }
    if (!add)
        return -ENOENT;
    if (!(t->keys[j] = strndup(s, n)))
        return -ENOMEM;
    t->slots[j] = UINT32_MAX;
    t->n++;
    *idx = j;
    return 0;
}

static void ids_free(id_table *t)
{
    for (size_t i = 0; i < t->cap; i++)
        free(t->keys[i]);
    free(t->keys); free(t->slots); free(t->live);
}

/* ---- parsing ------------------------------------------------------------ */

static int push_op(wa_trace *t, const trace_op *op)
{
    if (WD_GROW(t->ops, t->cap_ops, t->n_ops + 1, 4096))
        return -ENOMEM;
    t->ops[t->n_ops++] = *op;
    return 0;
}

static int push_text(wa_trace *t, const char *s, size_t n, uint32_t *index)
{
    if (WD_GROW(t->texts, t->cap_texts, t->n_texts + 1, 16))
        return -ENOMEM;
    if (!(t->texts[t->n_texts] = strndup(s, n)))
        return -ENOMEM;
    *index = (uint32_t)t->n_texts++;
    return 0;
}

/* Splits the next space-separated word off *p (within end). */
static bool word(const char **p, const char *end, const char **w, size_t *n)
{
    const char *s = *p;

    while (s < end && isspace((unsigned char)*s))
        s++;
    *w = s;
    while (s < end && !isspace((unsigned char)*s))
        s++;
    *n = (size_t)(s - *w);
    *p = s;
    return *n > 0;
}

static bool parse_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;

    if (n == 0 || n > 20)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return false;
        if (v > (UINT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

int wa_trace_parse(const char *text, size_t len, const char *name, wa_trace **out, wd_error *err)
{
    wa_trace *t = calloc(1, sizeof *t);
    id_table ids = {0};
    uint64_t *slot_bytes = NULL;
    size_t slot_cap = 0;
    uint64_t live = 0;
    const char *p = text, *end = text + len;
    uint32_t line = 0;
    int rc = 0;

    if (!t || !(t->name = strdup(name ? name : "trace"))) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    t->n_devices = 1;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p)), *w, *rest;
        size_t n;
        trace_op op = {0};

        if (!eol)
            eol = end;
        line++;
        op.line = line;
        rest = p;
        if (memchr(p, '#', (size_t)(eol - p)))
            eol = memchr(p, '#', (size_t)(eol - p)); /* a comment runs to the end of the line */
        if (!word(&rest, eol, &w, &n))
            goto next;
        if (n == 5 && memcmp(w, "alloc", 5) == 0) {
            const char *id, *b, *dv;
            size_t idn, bn, dn, idx;
            uint64_t dev = 0;
            if (!word(&rest, eol, &id, &idn) || !word(&rest, eol, &b, &bn) || !parse_u64(b, bn, &op.bytes)) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: expected \"alloc ID BYTES [DEVICE]\"", t->name, line);
                goto out;
            }
            if (word(&rest, eol, &dv, &dn) && (!parse_u64(dv, dn, &dev) || dev > 63)) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: bad device \"%.*s\" (0 to 63)", t->name, line, (int)dn, dv);
                goto out;
            }
            if (word(&rest, eol, &dv, &dn)) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: unexpected \"%.*s\"", t->name, line, (int)dn, dv);
                goto out;
            }
            if ((rc = ids_find(&ids, id, idn, true, &idx)))
                goto nomem;
            if (ids.live[idx]) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: block \"%.*s\" is already allocated", t->name, line,
                                  (int)idn, id);
                goto out;
            }
            if (ids.slots[idx] == UINT32_MAX)
                ids.slots[idx] = t->n_slots++;
            ids.live[idx] = true;
            op.kind = OP_ALLOC;
            op.slot = ids.slots[idx];
            op.device = (int)dev;
            if ((int)dev + 1 > t->n_devices)
                t->n_devices = (int)dev + 1;
            if (WD_GROW(slot_bytes, slot_cap, (size_t)op.slot + 1, 1024))
                goto nomem;
            slot_bytes[op.slot] = op.bytes;
            live += op.bytes;
            if (live > t->peak_live)
                t->peak_live = live;
        } else if (n == 4 && memcmp(w, "free", 4) == 0) {
            const char *id;
            size_t idn, idx;
            if (!word(&rest, eol, &id, &idn) || word(&rest, eol, &w, &n)) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: expected \"free ID\"", t->name, line);
                goto out;
            }
            if (ids_find(&ids, id, idn, false, &idx) || !ids.live[idx]) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: free of \"%.*s\", which is not allocated", t->name, line,
                                  (int)idn, id);
                goto out;
            }
            ids.live[idx] = false;
            op.kind = OP_FREE;
            op.slot = ids.slots[idx];
            live -= slot_bytes[op.slot];
        } else if ((n == 6 && memcmp(w, "policy", 6) == 0) || (n == 4 && memcmp(w, "mark", 4) == 0)) {
            const char *arg = rest, *arg_end = eol;
            op.kind = w[0] == 'p' ? OP_POLICY : OP_MARK;
            while (arg < arg_end && isspace((unsigned char)*arg))
                arg++;
            while (arg_end > arg && isspace((unsigned char)arg_end[-1]))
                arg_end--;
            if (arg == arg_end) {
                rc = wd_error_set(err, -EBADMSG, "%s:%u: %.*s needs an argument", t->name, line, (int)n, w);
                goto out;
            }
            if (push_text(t, arg, (size_t)(arg_end - arg), &op.text))
                goto nomem;
        } else {
            rc = wd_error_set(err, -EBADMSG, "%s:%u: unknown operation \"%.*s\"", t->name, line, (int)n, w);
            goto out;
        }
        if (push_op(t, &op))
            goto nomem;
next:
        p = memchr(p, '\n', (size_t)(end - p));
        p = p ? p + 1 : end;
    }
    *out = t;
    t = NULL;
    goto out;
nomem:
    rc = wd_error_set(err, -ENOMEM, "out of memory parsing %s", name);
out:
    ids_free(&ids);
    free(slot_bytes);
    wa_trace_free(t);
    return rc;
}

int wa_trace_load(const char *path, wa_trace **out, wd_error *err)
{
    struct stat st;
    char *buf = NULL;
    size_t got = 0;
    int fd, rc = 0;

    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return wd_error_set(err, -errno, "%s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = wd_error_set(err, -EINVAL, "%s: not a regular file", path);
        goto out;
    }
    if (!(buf = malloc((size_t)st.st_size + 1))) {
        rc = wd_error_set(err, -ENOMEM, "%s: out of memory", path);
        goto out;
    }
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = wd_error_set(err, n < 0 ? -errno : -EIO, "%s: read failed", path);
            goto out;
        }
        got += (size_t)n;
    }
    rc = wa_trace_parse(buf, got, path, out, err);
out:
    free(buf);
    close(fd);
    return rc;
}

void wa_trace_free(wa_trace *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n_texts; i++)
        free(t->texts[i]);
    free(t->texts);
    free(t->ops);
    free(t->name);
    free(t);
}

size_t wa_trace_ops(const wa_trace *t) { return t->n_ops; }
int wa_trace_devices(const wa_trace *t) { return t->n_devices; }
uint64_t wa_trace_peak_live(const wa_trace *t) { return t->peak_live; }

/* ---- replay ------------------------------------------------------------- */

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int wa_trace_replay(const wa_trace *t, const wa_replay_opts *opts, wa_replay_result *r, wd_error *err)
{
    wa_backend *backend = NULL;
    wa_allocator *a = NULL;
    wa_block **blocks = NULL;
    wa_config start;
    uint64_t live = 0;
    size_t marks_cap = 0;
    double t0;
    int rc;

    memset(r, 0, sizeof *r);
    r->ok = true;
    rc = wa_backend_fake_create(t->n_devices, opts->capacity ? opts->capacity : (1ULL << 62), &backend, err);
    if (rc)
        return rc;
    if ((rc = wa_create(backend, opts->conf, &a, err)))
        goto out;
    start = *wa_get_config(a);
    if (!(blocks = calloc(t->n_slots ? t->n_slots : 1, sizeof *blocks))) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    t0 = now_seconds();
    for (size_t i = 0; i < t->n_ops; i++) {
        const trace_op *op = &t->ops[i];
        switch (op->kind) {
        case OP_ALLOC: {
            wd_error oom = {0};
            rc = wa_malloc(a, op->device, op->bytes, &blocks[op->slot], &oom);
            if (rc == -ENOMEM) {
                r->ok = false;
                r->oom_line = op->line;
                snprintf(r->oom_message, sizeof r->oom_message, "%s", wd_error_text(&oom));
                rc = 0;
                goto done;
            }
            if (rc) {
                wd_error_set(err, rc, "%s:%u: %s", t->name, op->line, wd_error_text(&oom));
                goto out;
            }
            live += op->bytes;
            if (live > r->peak_live)
                r->peak_live = live;
            break;
        }
        case OP_FREE: {
            wa_region reg;
            wa_block_region(blocks[op->slot], &reg);
            live -= reg.requested;
            wa_free(a, blocks[op->slot]);
            blocks[op->slot] = NULL;
            break;
        }
        case OP_POLICY: {
            /* Literal PyTorch semantics: each line is a parseArgs() call;
             * or each line starts the load policy. "default" goes back to
             * what the replay started with. */
            wa_config next;
            const char *text = t->texts[op->text];
            if (strcmp(text, "default") == 0)
                next = start;
            else if (opts->load_policy)
                rc = wa_config_parse(opts->load_policy, &start, WA_CONF_OVERLAY, &next, err);
            else
                rc = wa_config_parse(text, wa_get_config(a), WA_CONF_PYTORCH, &next, err);
            if (rc)
                goto bad_line;
            if ((rc = wa_set_config(a, &next))) {
                wd_error_set(err, rc, "the fake backend cannot apply \"%s\"", text);
                goto bad_line;
            }
            break;
        }
        case OP_MARK: {
            wa_replay_mark *m;
            wa_stats s;
            if (WD_GROW(r->marks, marks_cap, r->n_marks + 1, 8)) {
                rc = wd_error_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            m = &r->marks[r->n_marks++];
            memset(m, 0, sizeof *m);
            snprintf(m->label, sizeof m->label, "%s", t->texts[op->text]);
            for (int d = 0; d < t->n_devices; d++) {
                wa_get_stats(a, d, &s);
                m->allocated += (uint64_t)s.allocated_bytes.current;
                m->reserved += (uint64_t)s.reserved_bytes.current;
                m->inactive_split += (uint64_t)s.inactive_split_bytes.current;
                if (s.largest_free_block > m->largest_free)
                    m->largest_free = s.largest_free_block;
            }
            break;
        }
        }
        r->ops++;
        if (opts->check && (rc = wa_check(a, err)))
            goto bad_line;
    }
done:
    r->seconds = now_seconds() - t0;
    for (int d = 0; d < t->n_devices; d++) {
        wa_stats s;
        wa_get_stats(a, d, &s);
        r->peak_allocated += (uint64_t)s.allocated_bytes.peak;
        r->peak_reserved += (uint64_t)s.reserved_bytes.peak;
    }
    goto out;
bad_line:
    wd_error_prefix(err, "%s:%u", t->name, t->ops[r->ops].line);
out:
    free(blocks);
    wa_destroy(a);
    wa_backend_destroy(backend);
    if (rc)
        wa_replay_result_free(r);
    return rc;
}

void wa_replay_result_free(wa_replay_result *r)
{
    free(r->marks);
    r->marks = NULL;
    r->n_marks = 0;
}

int wa_trace_min_capacity(const wa_trace *t, const wa_replay_opts *opts, uint64_t step, uint64_t *out,
                          wd_error *err)
{
    wa_replay_opts o = *opts;
    wa_replay_result r;
    uint64_t lo, hi;
    int rc;

    /* Uncapped first: its peak reserved is a capacity that certainly works. */
    o.capacity = 0;
    if ((rc = wa_trace_replay(t, &o, &r, err)))
        return rc;
    hi = (r.peak_reserved + step - 1) / step;   /* in steps; succeeds */
    wa_replay_result_free(&r);
    lo = t->peak_live / step;                   /* in steps; cannot succeed below the live peak */
    if (lo > 0)
        lo--;
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        o.capacity = mid * step;
        if ((rc = wa_trace_replay(t, &o, &r, err)))
            return rc;
        if (r.ok)
            hi = mid;
        else
            lo = mid;
        wa_replay_result_free(&r);
    }
    *out = hi * step;
    return 0;
}
