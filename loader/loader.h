/* Moving tensor bytes between checkpoint files and device segments: a load
 * copies them in, a verify compares them. A job runs on one worker thread;
 * its progress and cancel flag may be touched from any thread. */
#ifndef WL_LOADER_H
#define WL_LOADER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "allocator/backend.h"
#include "common/errors.h"
#include "loader/checkpoint.h"

/* Where one tensor's bytes live. mem is NULL for an empty tensor. */
typedef struct wl_dest {
    int device;
    const wa_mem *mem;
    uint64_t offset;     /* within the segment */
} wl_dest;

typedef enum wl_mode { WL_LOAD, WL_VERIFY } wl_mode;

typedef struct wl_job {
    /* set by the caller */
    wl_mode mode;
    const wl_checkpoint *ckpt;
    const wl_dest *dest;         /* one per ckpt->tensors entry */
    wa_backend *backend;
    size_t chunk_size;           /* bytes per read; 0 = 16 MiB */
    /* progress */
    _Atomic uint64_t bytes_done;
    _Atomic uint64_t tensors_done;
    atomic_bool cancel;
    /* results */
    wd_error err;
    uint64_t mismatched_tensors; /* verify */
    char first_mismatch[512];    /* verify: "tensor X: first difference at byte N" */
} wl_job;

/* Runs the job to the end; 0, -ECANCELED, or a negative errno with job->err
 * naming the file and the tensor. A verify that finds differences returns 0
 * and counts them in mismatched_tensors. */
int wl_job_run(wl_job *job);

#endif
