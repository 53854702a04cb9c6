/* Mixture-of-experts structure from tensor names. */
#include "loader/moe.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "common/grow.h"

/* The number after `key` (".layers." etc.) if the name has one, followed by
 * a '.' or the end. */
static bool number_after(const char *name, const char *key, uint64_t *out, const char **rest)
{
    size_t k = strlen(key);

    for (const char *p = strstr(name, key); p; p = strstr(p + 1, key)) {
        const char *d = p + k;
        uint64_t v = 0;
        int n = 0;
        /* "layers.3" at the start of a name counts too. */
        if (p != name && key[0] != '.')
            continue;
        while (isdigit((unsigned char)d[n]) && n < 12)
            v = v * 10 + (uint64_t)(d[n++] - '0');
        if (n && (d[n] == '.' || d[n] == '\0')) {
            *out = v;
            if (rest)
                *rest = d + n;
            return true;
        }
    }
    return false;
}

static bool layer_of(const char *name, uint64_t *layer, const char **rest)
{
    static const char *const keys[] = {".layers.", "layers.", ".h.", ".blocks.", ".block."};

    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (number_after(name, keys[i], layer, rest))
            return true;
    return false;
}

static wl_expert_kind expert_of(const char *rest, uint64_t *expert)
{
    const char *p = strstr(rest, ".experts.");

    if (!p || strstr(rest, "shared_expert"))
        return WL_NOT_EXPERT;
    if (number_after(p, ".experts.", expert, NULL))
        return WL_PER_EXPERT;
    return WL_FUSED_EXPERTS;
}

wl_expert_kind wl_moe_classify(const char *name, bool *has_layer, uint64_t *layer, uint64_t *expert)
{
    const char *rest;

    *has_layer = layer_of(name, layer, &rest);
    return *has_layer ? expert_of(rest, expert) : WL_NOT_EXPERT;
}

static wl_moe_layer *find_layer(wl_moe *m, uint64_t index, size_t *cap)
{
    for (size_t i = 0; i < m->n_layers; i++)
        if (m->layers[i].index == index)
            return &m->layers[i];
    if (WD_GROW(m->layers, *cap, m->n_layers + 1, 64))
        return NULL;
    memset(&m->layers[m->n_layers], 0, sizeof m->layers[0]);
    m->layers[m->n_layers].index = index;
    return &m->layers[m->n_layers++];
}

static int cmp_layer(const void *a, const void *b)
{
    const wl_moe_layer *x = a, *y = b;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Experts seen in a layer, per-expert layout: a small set of numbers. */
typedef struct expert_set {
    uint64_t *ids;
    size_t n, cap;
} expert_set;

static int set_add(expert_set *s, uint64_t id)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->ids[i] == id)
            return 0;
    if (WD_GROW(s->ids, s->cap, s->n + 1, 16))
        return -ENOMEM;
    s->ids[s->n++] = id;
    return 0;
}

int wl_moe_analyse(const wl_checkpoint *c, wl_moe *out, wd_error *err)
{
    expert_set *sets = NULL;
    size_t cap = 0, sets_cap = 0;
    bool any_fused = false, any_per_expert = false;
    int rc = 0;

    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < c->n_tensors; i++) {
        const st_tensor *t = c->tensors[i].st;
        uint64_t bytes = st_tensor_nbytes(t), index, expert = 0;
        const char *rest;
        wl_moe_layer *l;
        wl_expert_kind kind;

        if (!layer_of(t->name, &index, &rest)) {
            out->outside_bytes += bytes;
            continue;
        }
        if (!(l = find_layer(out, index, &cap)))
            goto nomem;
        {
            size_t had = sets_cap; /* a set per layer, empty when new */
            if (WD_GROW(sets, sets_cap, out->n_layers, 64))
                goto nomem;
            memset(sets + had, 0, (sets_cap - had) * sizeof *sets);
        }
        out->layer_bytes += bytes;
        kind = expert_of(rest, &expert);
        if (kind == WL_NOT_EXPERT) {
            l->other_bytes += bytes;
            continue;
        }
        l->expert_tensors++;
        l->expert_bytes += bytes;
        out->expert_bytes += bytes;
        out->expert_tensors++;
        if (kind == WL_PER_EXPERT) {
            any_per_expert = true;
            if (set_add(&sets[l - out->layers], expert))
                goto nomem;
            l->experts = (uint32_t)sets[l - out->layers].n;
        } else {
            /* A fused tensor's leading dimension is the expert count. */
            any_fused = true;
            l->fused = true;
            if (t->ndim && t->shape[0] > l->experts && t->shape[0] <= UINT32_MAX)
                l->experts = (uint32_t)t->shape[0];
        }
    }
    if (out->n_layers)
        qsort(out->layers, out->n_layers, sizeof *out->layers, cmp_layer);
    for (size_t i = 0; i < out->n_layers; i++)
        if (out->layers[i].experts > out->experts_per_layer)
            out->experts_per_layer = out->layers[i].experts;
    out->layout = any_fused && any_per_expert ? WL_MOE_MIXED
                  : any_fused                 ? WL_MOE_FUSED
                  : any_per_expert            ? WL_MOE_PER_EXPERT
                                              : WL_MOE_DENSE;
    goto out;
nomem:
    rc = wd_error_set(err, -ENOMEM, "out of memory");
    wl_moe_free(out);
out:
    for (size_t i = 0; i < sets_cap; i++)
        free(sets[i].ids);
    free(sets);
    return rc;
}

void wl_moe_free(wl_moe *m)
{
    free(m->layers);
    memset(m, 0, sizeof *m);
}

const char *wl_moe_layout_name(wl_moe_layout layout)
{
    static const char *const names[] = {"dense", "per-expert", "fused", "mixed"};
    return names[layout];
}
