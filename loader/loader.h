/* Moving tensor bytes between checkpoint files and device segments: a load
 * copies them in, a verify compares them.
 *
 * A pipeline is the reading machinery, made once and kept across loads: a
 * set of readers (each job starts their threads anew) and, for devices the
 * CPU cannot address, their pinned staging buffers (two per reader, each
 * with its own copy lane, so that a reader reads its next chunk while the
 * last one is being copied). The checkpoint's
 * data is cut into chunks of the staging buffers' size, 4 KiB-aligned in the
 * file; small tensors share a chunk and large ones span several. Chunks are
 * taken in file order. Host memory use is the staging size, whatever the
 * model's. Segments the CPU can address (host backend) are read into
 * directly. Reads go through the page cache unless O_DIRECT is asked for:
 * on the GPU machine's disk both ran at 92-93% of a plain parallel read
 * cold (1.62 and 1.64 GB/s against 1.77), and the page cache makes the
 * next load of the same checkpoint a warm one. */
#ifndef WL_LOADER_H
#define WL_LOADER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "allocator/backend.h"
#include "common/errors.h"
#include "loader/checkpoint.h"

/* Where a run of one tensor's bytes lives: bytes [tensor_off, tensor_off +
 * len) of tensor `tensor`, at `offset` in the segment `mem` on `device`.
 * mem is NULL when len is 0. A tensor may have several: a replicated model
 * has one per device, a split one several parts. */
typedef struct wl_dest {
    uint32_t tensor;
    uint64_t tensor_off, len;
    int device;
    const wa_mem *mem;
    uint64_t offset;
} wl_dest;

/* WL_LOAD: files to devices; WL_VERIFY: files against devices, byte for
 * byte; WL_QUICK: every copy on the devices against the checksums in sums,
 * without the files; WL_OFFLOAD: devices to files, the reverse of a load
 * (a model put to sleep: its shards' files are writable memfds of their
 * sizes, and a tensor on several devices is written once). */
typedef enum wl_mode { WL_LOAD, WL_VERIFY, WL_QUICK, WL_OFFLOAD } wl_mode;
typedef enum wl_direct { WL_DIRECT_OFF, WL_DIRECT_ON } wl_direct;

typedef struct wl_pipeline_opts {
    unsigned threads;    /* 0: three for every four CPUs, 2 to 12 */
    uint64_t staging;    /* bytes of staging in all (device backends); 0: 4 MiB a buffer */
    wl_direct direct;    /* O_DIRECT reads for staged loads, or the page cache */
    bool plain;          /* plain buffers, no pinned staging (verify pipelines) */
    bool stage_host;     /* load through the buffers even where the CPU can address the device:
                          * the path of GPU loads, for tests without a GPU */
} wl_pipeline_opts;

typedef struct wl_pipeline wl_pipeline;

int wl_pipeline_create(wa_backend *backend, const wl_pipeline_opts *opts, wl_pipeline **out, wd_error *err);
void wl_pipeline_destroy(wl_pipeline *p);
unsigned wl_pipeline_threads(const wl_pipeline *p);
uint64_t wl_pipeline_chunk(const wl_pipeline *p);

typedef struct wl_job {
    /* set by the caller */
    wl_mode mode;
    const wl_checkpoint *ckpt;
    const wl_dest *dest;         /* in tensor order, then by tensor_off */
    size_t n_dest;
    /* dest[0, dests_ready) have their memory. A load may give the rest
     * theirs while the job runs (store with release order): a chunk waits
     * only for the dests it feeds. Set it to n_dest when all are ready. */
    _Atomic size_t dests_ready;
    /* progress, readable from any thread: bytes and dests (tensors on devices)
     * done, out of the dests' lens and n_dest */
    _Atomic uint64_t bytes_done;
    _Atomic uint64_t tensors_done;
    atomic_bool cancel;
    uint64_t *sums;              /* load: when set, each tensor's checksum (common/checksum.h), n_tensors;
                                  * quick: the checksums to check against */
    /* results */
    wd_error err;
    uint64_t mismatched_tensors; /* verify, quick */
    char first_mismatch[512];    /* verify: "tensor X: first difference at byte N" */
} wl_job;

/* Runs the job to the end on the pipeline's threads; one job at a time per
 * pipeline. 0, -ECANCELED, or a negative errno with job->err naming the
 * file and the tensor. A verify that finds differences returns 0 and counts
 * them in mismatched_tensors. */
int wl_job_run(wl_pipeline *p, wl_job *job);

#endif
