/* Placement of tensors across devices (placement.h). */
#include "loader/placement.h"

#include <stdlib.h>
#include <string.h>

#include "loader/moe.h"
#include "common/fault.h"

int wl_placement_parse(const char *text, wl_placement *out)
{
    if (strcmp(text, "replicate") == 0)
        *out = WL_REPLICATE;
    else if (strcmp(text, "expert-parallel") == 0)
        *out = WL_EXPERT_PARALLEL;
    else
        return -EINVAL;
    return 0;
}

const char *wl_placement_name(wl_placement kind)
{
    return kind == WL_EXPERT_PARALLEL ? "expert-parallel" : "replicate";
}

static uint32_t experts_in_layer(const wl_moe *m, uint64_t layer)
{
    for (size_t i = 0; i < m->n_layers; i++)
        if (m->layers[i].index == layer)
            return m->layers[i].experts;
    return 0;
}

int wl_place(const wl_checkpoint *ck, const int *devices, size_t n_devices, wl_placement kind, wl_target **out,
             size_t *n, wd_error *err)
{
    wl_target *t = NULL;
    wl_moe moe = {0};
    size_t count = 0;
    bool split;
    int rc = 0;

    *out = NULL;
    *n = 0;
    if (n_devices == 0)
        return wd_error_set(err, -EINVAL, "no devices to place the model on");
    /* On one device there is nothing to split. */
    split = kind == WL_EXPERT_PARALLEL && n_devices > 1;
    if (split && (rc = wl_moe_analyse(ck, &moe, err)))
        return rc;
    if (!(t = wd_calloc((ck->n_tensors ? ck->n_tensors : 1) * n_devices, sizeof *t))) {
        rc = wd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < ck->n_tensors; i++) {
        const st_tensor *x = ck->tensors[i].st;
        uint64_t bytes = st_tensor_nbytes(x), layer = 0, expert = 0;
        bool has_layer;
        wl_expert_kind ek =
            split && bytes ? wl_moe_classify(x->name, &has_layer, &layer, &expert) : WL_NOT_EXPERT;

        if (ek == WL_PER_EXPERT) {
            /* Contiguous groups of experts: expert e of n on devices[e*D/n]. */
            uint32_t experts = experts_in_layer(&moe, layer);
            size_t d = expert < experts ? (size_t)(expert * n_devices / experts) : (size_t)(expert % n_devices);
            t[count++] = (wl_target){(uint32_t)i, 0, bytes, devices[d]};
        } else if (ek == WL_FUSED_EXPERTS && x->ndim >= 1 && x->shape[0] >= 1 && bytes % x->shape[0] == 0) {
            /* Rows of the leading (expert) dimension are contiguous bytes. */
            uint64_t rows = x->shape[0], row = bytes / rows;
            for (size_t d = 0; d < n_devices; d++) {
                uint64_t first = rows * d / n_devices, last = rows * (d + 1) / n_devices;
                if (last > first)
                    t[count++] = (wl_target){(uint32_t)i, first * row, (last - first) * row, devices[d]};
            }
        } else {
            for (size_t d = 0; d < n_devices; d++)
                t[count++] = (wl_target){(uint32_t)i, 0, bytes, devices[d]};
        }
    }
    *out = t;
    *n = count;
    t = NULL;
out:
    free(t);
    wl_moe_free(&moe);
    return rc;
}
