/* Synthetic checkpoints: real safetensors shards and a Hugging Face index in
 * the tensor names, dtypes and shapes of public models, filled with
 * reproducible pseudo-random bytes. weightd-mkckpt is a thin CLI over this;
 * tests and benchmarks call it directly.
 *
 * A preset is one table entry: the model's defaults and a list of tensor
 * templates. Adding a model is adding an entry to wl_presets (ckpt_writer.c). */
#ifndef WL_CKPT_WRITER_H
#define WL_CKPT_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/errors.h"
#include "loader/safetensors.h"

/* What Hugging Face writers use (max_shard_size="5GB"). */
#define WL_DEFAULT_SHARD_SIZE 5000000000ULL
#define WL_TMPL_MAX_DIMS 4

/* A template dimension: a positive constant, or one of these. */
enum { WL_DIM_EXPERTS = -1, WL_DIM_VOCAB = -2 };

typedef enum wl_scope {
    WL_HEAD,       /* once, before the layers */
    WL_LAYER,      /* once per layer; "{L}" in the name is the layer */
    WL_EXPERT,     /* once per layer and expert; "{X}" is the expert. A run of
                      consecutive WL_EXPERT entries is written expert by expert */
    WL_TAIL,       /* once, after the layers */
} wl_scope;

typedef struct wl_tensor_tmpl {
    wl_scope scope;
    const char *name;
    st_dtype dtype;
    unsigned ndim;
    int64_t shape[WL_TMPL_MAX_DIMS];
} wl_tensor_tmpl;

typedef struct wl_preset {
    const char *name;          /* "gpt-oss-120b" */
    const char *model;         /* "openai/gpt-oss-120b" */
    unsigned layers, experts;  /* the real model's */
    uint64_t vocab;
    const wl_tensor_tmpl *tensors;
    size_t n_tensors;
} wl_preset;

extern const wl_preset wl_presets[];
extern const size_t wl_n_presets;

/* NULL for an unknown name. */
const wl_preset *wl_preset_find(const char *name);

typedef struct wl_ckpt_options {
    const wl_preset *preset;
    const char *out_dir;
    unsigned layers, experts;  /* 0: the preset's */
    uint64_t vocab;            /* 0: the preset's */
    uint64_t seed;
    uint64_t shard_size;       /* 0: WL_DEFAULT_SHARD_SIZE */
    bool force;                /* replace the checkpoint files already in out_dir */
    bool sparse;               /* data left as holes (zeros): headers and sizes only */
    FILE *log;                 /* a line per shard and a summary; NULL: quiet */
} wl_ckpt_options;

typedef struct wl_plan_tensor {
    char *name;
    st_dtype dtype;
    size_t ndim;
    uint64_t shape[WL_TMPL_MAX_DIMS];
    uint64_t nbytes;
    uint32_t shard;
} wl_plan_tensor;

typedef struct wl_plan_shard {
    char *file_name;           /* "model-00001-of-00003.safetensors" */
    size_t first, count;       /* a range of the plan's tensors */
    uint64_t data_bytes;
} wl_plan_shard;

typedef struct wl_ckpt_plan {
    unsigned layers, experts;
    uint64_t vocab;
    size_t n_tensors;
    wl_plan_tensor *tensors;   /* in file order */
    size_t n_shards;
    wl_plan_shard *shards;
    uint64_t total_bytes;      /* tensor bytes, the index's total_size */
} wl_ckpt_plan;

typedef struct wl_ckpt_result {
    size_t n_shards, n_tensors;
    uint64_t total_bytes;      /* tensor bytes */
    uint64_t file_bytes;       /* on disk, headers and index included */
    double seconds;
} wl_ckpt_result;

/* The tensors and their shards, without writing anything. Tensors fill a
 * shard in order; one that would push it past shard_size starts the next
 * (so a tensor larger than shard_size sits alone). -EINVAL for bad options. */
int wl_ckpt_plan_make(const wl_ckpt_options *o, wl_ckpt_plan *out, wd_error *err);
void wl_ckpt_plan_free(wl_ckpt_plan *p);

/* Writes out_dir/model-0000i-of-0000K.safetensors and
 * model.safetensors.index.json (creating out_dir, and its parents, if
 * needed). Files are written under temporary names and renamed when all are
 * complete; on failure nothing new is left behind. -EEXIST when out_dir
 * already holds *.safetensors or *.safetensors.index.json files and
 * !o->force; with force those are removed once the new ones are in place.
 * res may be NULL. */
int wl_ckpt_write(const wl_ckpt_options *o, wl_ckpt_result *res, wd_error *err);

/* The contents: len bytes of tensor name at byte offset within the tensor.
 * They depend only on seed, name and offset (counter-based splitmix64), so
 * any range can be produced or checked on its own. */
void wl_ckpt_fill(uint64_t seed, const char *name, uint64_t offset, void *buf, size_t len);

#endif
