/* The mixture-of-experts structure of a checkpoint, from its tensor names:
 * which layers it has, how many experts each layer holds, and how the bytes
 * split between experts and the rest. Two layouts are recognised:
 *   per-expert  model.layers.3.mlp.experts.17.down_proj.weight
 *               model.layers.3.block_sparse_moe.experts.5.w1.weight
 *   fused       model.layers.3.mlp.experts.gate_up_proj_blocks [E, ...]
 * Shared experts (".shared_experts.", ".shared_expert.") are counted with
 * the rest of their layer: every token goes through them. */
#ifndef WL_MOE_H
#define WL_MOE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/errors.h"
#include "loader/checkpoint.h"

typedef enum wl_moe_layout { WL_MOE_DENSE, WL_MOE_PER_EXPERT, WL_MOE_FUSED, WL_MOE_MIXED } wl_moe_layout;

typedef struct wl_moe_layer {
    uint64_t index;            /* N of "layers.N." */
    uint32_t experts;          /* per-expert: distinct expert numbers; fused: leading dimension */
    size_t expert_tensors;
    uint64_t expert_bytes;
    uint64_t other_bytes;      /* attention, norms, router, shared experts */
    bool fused;
} wl_moe_layer;

typedef struct wl_moe {
    wl_moe_layout layout;
    size_t n_layers;
    wl_moe_layer *layers;      /* in layer order */
    uint32_t experts_per_layer;   /* the most experts any layer has */
    uint64_t expert_bytes;     /* every layer's experts */
    uint64_t layer_bytes;      /* every layer, experts included */
    uint64_t outside_bytes;    /* not in any layer: embeddings, final norm, head */
    size_t expert_tensors;
} wl_moe;

int wl_moe_analyse(const wl_checkpoint *c, wl_moe *out, wd_error *err);

/* One tensor, by its name: not an expert (or a shared one), one expert's
 * (*expert is its number), or every expert's, fused along the first
 * dimension. *layer is its layer when it has one. */
typedef enum wl_expert_kind { WL_NOT_EXPERT, WL_PER_EXPERT, WL_FUSED_EXPERTS } wl_expert_kind;
wl_expert_kind wl_moe_classify(const char *name, bool *has_layer, uint64_t *layer, uint64_t *expert);
void wl_moe_free(wl_moe *m);
const char *wl_moe_layout_name(wl_moe_layout layout);

#endif
