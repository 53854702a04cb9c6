/* libweightd-torch.so: weightd's allocator inside a PyTorch process, as a
 * CUDA pluggable allocator (torch.cuda.memory.CUDAPluggableAllocator takes
 * weightd_torch_alloc and weightd_torch_free; weightd.torch_allocator wraps
 * the rest). Thread-safe: one lock around the allocator.
 *
 * Set up on the first call, from the environment:
 *   WEIGHTD_ALLOC_CONF      the configuration, in PyTorch's syntax with
 *                           weightd's keys too ("expandable_segments:True,...")
 *   WEIGHTD_TORCH_BACKEND   cuda (the default), or host or fake for tests
 *   WEIGHTD_TORCH_CAPACITY  bytes each device may reserve ("20GiB"); cuda:
 *                           default what is free at the first call
 *   WEIGHTD_TORCH_DEVICES   host and fake: how many devices (default 1)
 *   WEIGHTD_TORCH_OOM       what a request that cannot be met does: abort
 *                           (the default: say why on stderr and abort(), as
 *                           PyTorch would take a NULL for memory) or null
 *                           (return NULL, for callers that check)
 * Functions that can fail return 0 or a negative errno, and
 * weightd_torch_error() says why. */
#ifndef WEIGHTD_TORCH_H
#define WEIGHTD_TORCH_H

#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* PyTorch's pluggable-allocator pair. stream is a cudaStream_t. A request
 * that fails says why on stderr, then aborts or returns NULL
 * (WEIGHTD_TORCH_OOM); size 0 gets NULL, as PyTorch's own gives. */
void *weightd_torch_alloc(ssize_t size, int device, void *stream);
void weightd_torch_free(void *ptr, ssize_t size, int device, void *stream);

/* Before the first allocation: the configuration, instead of
 * WEIGHTD_ALLOC_CONF. -EBUSY once set up. */
int weightd_torch_configure(const char *conf);
/* The policy stack: push conf over the configuration in force; pop
 * restores exactly what was in force before the matching push. */
int weightd_torch_policy_push(const char *conf);
int weightd_torch_policy_pop(void);
/* The canonical text of the configuration in force, into buf. */
int weightd_torch_policy(char *buf, size_t len);
/* weightd's load policy (what `weightctl load` pushes), for policy_push. */
const char *weightd_torch_load_policy(void);

/* Requests from now on go under tag (NULL or "": none), whose memory can
 * sleep; a tag's blocks live in segments of its own. */
int weightd_torch_set_tag(const char *tag);
/* Every byte under tag goes back to the devices, the addresses stay; with
 * offload its contents are kept in host memory for wake. wake maps memory
 * again at the same addresses. The caller makes sure no kernel still uses
 * it (torch.cuda.synchronize()). */
int weightd_torch_sleep(const char *tag, int offload);
int weightd_torch_wake(const char *tag);

/* Every wholly free segment and page goes back to the devices. */
int weightd_torch_empty_cache(void);
int weightd_torch_reset_peaks(void);

/* JSON into *json: statistics in torch.cuda.memory_stats()'s names, and
 * the segments and blocks of a device. Free with weightd_torch_string_free. */
int weightd_torch_stats(int device, char **json);
int weightd_torch_snapshot(int device, char **json);
void weightd_torch_string_free(char *s);

/* Why this thread's last call failed. */
const char *weightd_torch_error(void);

#ifdef __cplusplus
}
#endif

#endif
