/* Checkpoint discovery: a single .safetensors file, a directory of them, or a
 * Hugging Face *.safetensors.index.json with its shards. Only the headers
 * are read (st_read); the data is the read pipeline's job.
 *
 * PATH may be:
 *  - a file ending in ".json": an index, {"weight_map": {tensor: shard file},
 *    "metadata": {...}}, shard files relative to the index's folder;
 *  - any other file: one safetensors file;
 *  - a directory: its model.safetensors.index.json if present; else its one
 *    *.safetensors.index.json (more than one is an error); else every
 *    *.safetensors file in it, in name order. Names starting with '.' are
 *    skipped (partial downloads and writers' temporary files).
 *
 * Every tensor must be in exactly one shard; with an index, the index and
 * the shards must agree exactly. */
#ifndef WL_CHECKPOINT_H
#define WL_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "common/errors.h"
#include "loader/safetensors.h"

/* Largest index file read (real ones are a few MB). */
#define WL_INDEX_MAX_LEN (256ULL << 20)

typedef struct wl_shard {
    char *path;
    int fd;                   /* open from discovery to close: loads and verifies read this file */
    uint64_t file_size;
    struct timespec mtime;    /* when its header was read: a load or verify that sees another fails */
    st_file st;
    /* NULL, or the file's bytes in memory of the caller's (a sleeping
     * model's host copy), file_size of them: jobs read and write there,
     * and fd is not used; host_pinned: registered with the backend, whose
     * copies read it directly, without staging */
    void *host;
    bool host_pinned;
} wl_shard;

typedef struct wl_tensor {
    const st_tensor *st;      /* points into shards[shard].st */
    uint32_t shard;
} wl_tensor;

typedef struct wl_checkpoint {
    char *path;               /* as given */
    char *index_path;         /* NULL without an index */
    size_t n_shards;
    wl_shard *shards;         /* in file-name order */
    size_t n_tensors;
    wl_tensor *tensors;       /* shard by shard, each in data order */
    uint64_t total_bytes;     /* sum of tensor bytes */
    /* Internal: the tensors in name order, for wl_checkpoint_find. */
    const wl_tensor **by_name;
} wl_checkpoint;

/* 0, or a negative errno with err naming the file, tensor and rule:
 * -ENOENT (missing path or shard), -EBADMSG (any format or consistency
 * violation), -EFBIG (index over WL_INDEX_MAX_LEN), -ENOMEM, -EIO/-errno.
 * out is zeroed on failure. */
int wl_checkpoint_open(const char *path, wl_checkpoint *out, wd_error *err);
/* The files of the checkpoint at path, by the rules above, as paths: its
 * index first (if it has one), then its shards. What a client opens to
 * hand the daemon its descriptors. */
int wl_checkpoint_files(const char *path, char ***files, size_t *n, wd_error *err);
/* Opens a checkpoint from files already open: fds[i] is files[i] (a path,
 * for messages and names; all in one folder), an index first if any, then
 * the shards it names, or shards alone. Takes every descriptor: the shards
 * keep theirs, the rest are closed (each fds[i] becomes -1). path is the
 * checkpoint as named. wl_checkpoint_open is discovery, open(2), then this. */
int wl_checkpoint_open_files(const char *path, char *const *files, int *fds, size_t n, wl_checkpoint *out,
                             wd_error *err);
/* A shard as a record of a loaded checkpoint keeps it (the daemon's fd
 * store, across a restart): its open file and its header's JSON text. */
typedef struct wl_saved_shard {
    const char *path;
    int fd;
    uint64_t file_size;
    struct timespec mtime;
    const char *header;       /* the N bytes after the 8-byte prefix */
    size_t header_len;
} wl_saved_shard;
/* The header text of shard s, read again from its descriptor (malloc'd,
 * NUL-terminated). */
int wl_shard_header(const wl_shard *s, char **json, size_t *len, wd_error *err);
/* The checkpoint again from saved shards, without reading them: each fd
 * must still be a file of the saved size and modification time (-ESTALE
 * otherwise), each header must parse. Takes every fd (kept or closed). */
int wl_checkpoint_reopen(const char *path, const char *index_path, const wl_saved_shard *shards, size_t n,
                         wl_checkpoint *out, wd_error *err);
/* Safe on a zeroed or already-closed checkpoint. */
void wl_checkpoint_close(wl_checkpoint *c);
/* How many shards' paths name another file now than the one opened
 * (renamed over, or gone); *first: the first of them. Jobs read what was
 * opened: this only says that the checkpoint at the path is another now. */
size_t wl_checkpoint_replaced(const wl_checkpoint *c, size_t *first);
/* The index a folder's checkpoint is read from when it has several. */
#define WL_DEFAULT_INDEX "model.safetensors.index.json"
/* A file discovery takes: a shard or an index, not hidden. */
int wl_is_checkpoint_file(const char *name);
/* dir + "/" + name, without doubling a trailing slash; malloc'd, NULL on ENOMEM. */
char *wl_join_path(const char *dir, const char *name);
/* Tensor bytes and, where count is not NULL, tensors, by dtype. */
void wl_checkpoint_dtype_totals(const wl_checkpoint *c, uint64_t bytes[ST_DTYPE_COUNT], size_t count[ST_DTYPE_COUNT]);
/* NULL if absent. O(log n). */
const wl_tensor *wl_checkpoint_find(const wl_checkpoint *c, const char *name);

#endif
