/* Where each tensor of a checkpoint goes when a model spans devices.
 *   replicate        every tensor on every device
 *   expert-parallel  each layer's experts split across the devices, in
 *                    contiguous groups (expert e of n on devices[e*D/n]);
 *                    a fused expert tensor [E, ...] is split by rows, so
 *                    each device holds a contiguous byte range of it;
 *                    everything else on every device
 * A single device is the plain case: every tensor once, on it. */
#ifndef WL_PLACEMENT_H
#define WL_PLACEMENT_H

#include <stddef.h>
#include <stdint.h>

#include "common/errors.h"
#include "loader/checkpoint.h"

typedef enum wl_placement { WL_REPLICATE, WL_EXPERT_PARALLEL } wl_placement;

/* A run of one tensor's bytes on one device. */
typedef struct wl_target {
    uint32_t tensor;     /* index into ckpt->tensors */
    uint64_t offset;     /* within the tensor */
    uint64_t len;
    int device;
} wl_target;

/* Targets in tensor order, and within a tensor by offset then device.
 * Every byte of every tensor is covered on at least one device. */
int wl_place(const wl_checkpoint *ck, const int *devices, size_t n_devices, wl_placement kind,
             wl_target **out, size_t *n, wd_error *err);
/* "replicate", "expert-parallel"; 0 or -EINVAL. */
int wl_placement_parse(const char *text, wl_placement *out);
const char *wl_placement_name(wl_placement kind);

#endif
